"""Reserved reply turns get a status of their own: "pending", instead of an empty interrupted model turn.

Data only (no table is rebuilt, so SQLite needs no batch copy); plain UPDATEs that PostgreSQL runs
alike. The downgrade turns them back into what 0001's code expects.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01 00:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

turns = sa.table(
    "turns",
    sa.column("role", sa.String(16)),
    sa.column("content", sa.Text()),
    sa.column("status", sa.String(16)),
)


def upgrade() -> None:
    """Mark every empty, interrupted model turn (a reply that reserved its place) as pending."""
    op.execute(
        turns.update()
        .where(turns.c.role == "model", turns.c.status == "interrupted", turns.c.content == "")
        .values(status="pending")
    )


def downgrade() -> None:
    """Pending turns go back to empty, interrupted model turns."""
    op.execute(
        turns.update().where(turns.c.status == "pending").values(status="interrupted", content="")
    )
