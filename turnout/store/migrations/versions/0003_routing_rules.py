"""routing rules

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 07:35:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('routing_rules',
    sa.Column('model_id', sa.String(length=300), nullable=False),
    sa.Column('rules', sa.JSON(), nullable=False),
    sa.Column('updated_by', sa.String(length=256), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model_id')
    )


def downgrade() -> None:
    op.drop_table('routing_rules')
