"""Operations on an open store: writes, reads, the size budget, the journal, verify/gc,
rewrites (rebase, compact), file formats and backup. Built on ``tdstore.storage``."""
