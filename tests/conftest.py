"""Shared fixtures: ledgers on every backend, a manual clock, a small catalog.

PostgreSQL tests run against ``BANDIT_ENGINE_TEST_POSTGRES_URL``, each in a fresh schema that is
dropped afterwards. When ``BANDIT_ENGINE_REQUIRE_POSTGRES=1`` (CI) a missing URL fails the test
instead of skipping it, so the PostgreSQL suite cannot silently vanish.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from bandit_engine import Engine, ManualClock, Offer

POSTGRES_URL = os.environ.get("BANDIT_ENGINE_TEST_POSTGRES_URL")
REQUIRE_POSTGRES = os.environ.get("BANDIT_ENGINE_REQUIRE_POSTGRES") == "1"


def _psycopg_url(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema (dropped after the test)."""
    if not POSTGRES_URL:
        if REQUIRE_POSTGRES:
            pytest.fail("BANDIT_ENGINE_REQUIRE_POSTGRES=1 but BANDIT_ENGINE_TEST_POSTGRES_URL is unset")
        pytest.skip("set BANDIT_ENGINE_TEST_POSTGRES_URL to run PostgreSQL tests")
    import psycopg

    schema = f"be_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_psycopg_url(POSTGRES_URL), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(_psycopg_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def ledger_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """The same tests on every ledger backend."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(start_ms=1_767_225_600_000)


@pytest.fixture
def engine(ledger_url: str, clock: ManualClock) -> Iterator[Engine]:
    eng = Engine.open(ledger_url, clock=clock, seed=7)
    try:
        yield eng
    finally:
        eng.ledger.close()


def catalog(n: int = 5, *, channel: str = "email", **extra) -> list[Offer]:
    cats = ["home", "beauty", "grocery", "fashion", "toys"]
    return [
        Offer(
            f"offer-{i}",
            channels=[channel],
            cost=1.00 + i,
            features={"category": cats[i % len(cats)], "discount": 0.05 * (i + 1)},
            **extra,
        )
        for i in range(n)
    ]
