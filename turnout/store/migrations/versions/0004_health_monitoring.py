"""health monitoring: threshold overrides and the monitor's latest snapshot per model

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:50:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('health_thresholds',
    sa.Column('model_id', sa.String(length=300), nullable=False),
    sa.Column('overrides', sa.JSON(), nullable=False),
    sa.Column('updated_by', sa.String(length=256), nullable=True),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model_id')
    )
    op.create_table('health_snapshots',
    sa.Column('model_id', sa.String(length=300), nullable=False),
    sa.Column('snapshot', sa.JSON(), nullable=False),
    sa.Column('checked_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model_id')
    )


def downgrade() -> None:
    op.drop_table('health_snapshots')
    op.drop_table('health_thresholds')
