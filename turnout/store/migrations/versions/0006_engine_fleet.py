"""engine fleet: engine hosts, holders of each version's engines, engine memory and use

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 14:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('engine_hosts',
    sa.Column('host_id', sa.String(length=256), nullable=False),
    sa.Column('task_queue', sa.String(length=300), nullable=False),
    sa.Column('instance_id', sa.String(length=64), nullable=False),
    sa.Column('capacity', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('host_id')
    )
    op.create_index(op.f('ix_engine_hosts_last_seen'), 'engine_hosts', ['last_seen'], unique=False)
    op.create_table('engine_holders',
    sa.Column('model_id', sa.String(length=300), nullable=False),
    sa.Column('version', sa.String(length=128), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('holder_id', sa.String(length=300), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('since', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('model_id', 'version', 'kind', 'holder_id')
    )
    with op.batch_alter_table('engines') as batch:
        batch.add_column(sa.Column('memory_bytes', sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column('last_used_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('sleeping', sa.Boolean(), nullable=False,
                                   server_default=sa.false()))
    with op.batch_alter_table('versions') as batch:
        batch.add_column(sa.Column('weights_bytes', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('versions') as batch:
        batch.drop_column('weights_bytes')
    with op.batch_alter_table('engines') as batch:
        batch.drop_column('sleeping')
        batch.drop_column('last_used_at')
        batch.drop_column('memory_bytes')
    op.drop_table('engine_holders')
    op.drop_index(op.f('ix_engine_hosts_last_seen'), table_name='engine_hosts')
    op.drop_table('engine_hosts')
