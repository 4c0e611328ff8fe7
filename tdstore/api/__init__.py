"""The public facade: ``tdstore.open``, ``Store``, ``Group``, ``BlockView`` and the seed
prototype's ``TokenDanceStorage``. Re-exported by ``tdstore``."""
