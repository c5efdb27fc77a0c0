"""longer keys: route change keys and engine holder ids as long as the ids they are made of

A route's change key is a workflow id and run id and a step (`replace-engine-<model>-
<version>-<host>/<run>/route` can pass 600 characters), and a preload's holder id is its
workflow id (`preload-<model>-<version>`, up to 394): on PostgreSQL, which enforces
VARCHAR lengths, String(300) refused them and the write failed after every retry.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 10:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('routes') as batch:
        batch.alter_column('change_key', existing_type=sa.String(length=300),
                           type_=sa.Text(), existing_nullable=True)
    with op.batch_alter_table('engine_holders') as batch:
        batch.alter_column('holder_id', existing_type=sa.String(length=300),
                           type_=sa.String(length=1024), existing_nullable=False)


def downgrade() -> None:
    # Keys longer than the old columns are cut (PostgreSQL would refuse them otherwise).
    op.execute("UPDATE routes SET change_key = substr(change_key, 1, 300)")
    with op.batch_alter_table('routes') as batch:
        batch.alter_column('change_key', existing_type=sa.Text(),
                           type_=sa.String(length=300), existing_nullable=True)
    # A holder whose id the old column cannot hold is let go: cut, it could never be
    # released and would keep its engines loaded for good.
    op.execute("DELETE FROM engine_holders WHERE length(holder_id) > 300")
    with op.batch_alter_table('engine_holders') as batch:
        batch.alter_column('holder_id', existing_type=sa.String(length=1024),
                           type_=sa.String(length=300), existing_nullable=False)
