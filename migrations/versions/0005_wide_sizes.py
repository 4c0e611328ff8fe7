"""wide sizes: agents.nbytes as a 64-bit integer (arrays of 2 GiB and more on PostgreSQL,
whose INTEGER is 32-bit; SQLite integers were always 64-bit)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.alter_column("nbytes", type_=sa.BigInteger(), existing_type=sa.Integer(),
                           existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("agents") as batch:
        batch.alter_column("nbytes", type_=sa.Integer(), existing_type=sa.BigInteger(),
                           existing_nullable=False)
