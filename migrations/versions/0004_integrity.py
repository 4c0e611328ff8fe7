"""integrity: per-chunk checksums bound to each array, the diff index's checksum, and
the journal of writes in progress and removals not yet done

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("chunk_crcs", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("index_crc", sa.BigInteger(), nullable=True))
    op.create_table(
        "pending",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("gid", sa.String(32), nullable=False, index=True),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("nbytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pending")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("index_crc")
        batch.drop_column("chunk_crcs")
