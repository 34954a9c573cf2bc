"""An offer's ``settled_cents`` counts a reservation as soon as it stops being held.

Pacing projects an offer's outstanding liability with its redemption rate, ``spent`` over every
reservation ever made, taken as ``settled + committed``. A redemption on a channel that sums
its rewards (``aggregation="sum"``) books its cost into ``spent`` and out of ``committed`` but
keeps the decision open until its window closes, and ``settled`` used to count the reservation
only then: the rate read high while such decisions were open, and the price with it. The
engine now moves into ``settled`` whatever leaves ``committed``, when it leaves. This migration
gives the decisions open at upgrade time the same treatment (their booked cost enters
``settled`` now; their expiry adds only what they still hold), so the sum stays exact.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_SHIFT = (
    "UPDATE offers SET settled_cents = settled_cents {sign} ("
    "SELECT COALESCE(SUM(d.spent_cents), 0) FROM decisions d "
    "WHERE d.offer_id = offers.offer_id AND d.status = 'open') "
    "WHERE offers.offer_id IN (SELECT offer_id FROM decisions "
    "WHERE status = 'open' AND spent_cents > 0)"
)


def upgrade() -> None:
    op.execute(_SHIFT.format(sign="+"))


def downgrade() -> None:
    op.execute(_SHIFT.format(sign="-"))
