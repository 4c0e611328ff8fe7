"""agent name index: keyed chunks are found by agent name across groups

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_agents_name", "agents", ["name"])


def downgrade() -> None:
    op.drop_index("ix_agents_name", table_name="agents")
