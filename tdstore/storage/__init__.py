"""Storage: the catalogue (models, migrations), array I/O, locks and the read path, behind
small interfaces (``ArrayStore``, ``Locks``). Depends only on ``tdstore.core``."""
