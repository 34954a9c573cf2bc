"""Root pytest configuration: Alembic's env.py only runs inside Alembic, never as a module."""

collect_ignore = ["bandit_engine/ledger/migrations"]
