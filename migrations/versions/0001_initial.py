"""initial catalogue: store metadata, groups, agents, diff-block index

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "store_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(), nullable=False),
    )
    op.create_table(
        "groups",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(), nullable=False, unique=True),
        sa.Column("gid", sa.String(32), nullable=False, unique=True),
        sa.Column("diff_threshold", sa.Float(), nullable=False),
        sa.Column("allow_nonfinite", sa.Boolean(), nullable=False),
        sa.Column("compressor", sa.String(32), nullable=True),
        sa.Column("chunk_blocks", sa.Integer(), nullable=True),
        sa.Column("dtype", sa.String(32), nullable=True),
        sa.Column("block_shape", sa.JSON(), nullable=True),
        sa.Column("n_blocks", sa.Integer(), nullable=False),
        sa.Column("kv_layout", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "agents",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "group_id",
            sa.Integer(),
            sa.ForeignKey("groups.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("role", sa.String(8), nullable=False),
        sa.Column("array", sa.String(), nullable=True),
        sa.Column("chunk_blocks", sa.Integer(), nullable=True),
        sa.Column("n_diff", sa.Integer(), nullable=False),
        sa.Column("nbytes", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("last_access", sa.Float(), nullable=False),
        sa.UniqueConstraint("group_id", "name"),
    )
    op.create_index("ix_agents_group_id", "agents", ["group_id"])
    op.create_index(
        "ix_agents_one_master",
        "agents",
        ["group_id"],
        unique=True,
        sqlite_where=sa.text("role = 'master'"),
        postgresql_where=sa.text("role = 'master'"),
    )
    op.create_table(
        "diff_blocks",
        sa.Column(
            "agent_id",
            sa.Integer(),
            sa.ForeignKey("agents.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("block_index", sa.Integer(), primary_key=True),
        sa.Column("slot", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("diff_blocks")
    op.drop_index("ix_agents_one_master", table_name="agents")
    op.drop_index("ix_agents_group_id", table_name="agents")
    op.drop_table("agents")
    op.drop_table("groups")
    op.drop_table("store_meta")
