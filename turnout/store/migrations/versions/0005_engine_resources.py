"""engine resources: each engine host's latest measurement of its engines

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 13:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('engine_resources',
    sa.Column('model_id', sa.String(length=300), nullable=False),
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('host', sa.String(length=256), nullable=False),
    sa.Column('figures', sa.JSON(), nullable=False),
    sa.Column('measured_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model_id', 'version', 'host')
    )


def downgrade() -> None:
    op.drop_table('engine_resources')
