"""Prometheus metrics (prometheus-client), one registry per app.

Under ``bandit-engine serve`` every worker writes to one ``PROMETHEUS_MULTIPROC_DIR`` (set up
by :func:`bandit_engine.api.commands.multiprocess_metrics`) and a scrape sums them all.
``budget_remaining`` is read from the database at scrape time, so it is the same whichever
worker answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _BudgetCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "bandit_engine_budget_remaining", "Budget left after spent and committed (currency units)",
            labels=["offer_id"],
        )
        try:
            offers = {o.offer_id: o for o in self.engine.offers() if o.budget_cents is not None}
            states = self.engine.ledger.offer_states(list(offers))
        except Exception:  # a scrape must not fail because the database hiccups
            offers, states = {}, {}
        for oid, o in offers.items():
            st = states.get(oid)
            if st is not None:
                g.add_metric([oid], st.remaining_cents(o.budget_cents) / 100)
        yield g


class Metrics:
    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decisions = Counter("bandit_engine_decisions", "Decisions served",
                                 ["channel", "group", "served"], registry=r)  # fmt: skip
        self.rewards = Counter("bandit_engine_rewards", "Rewards received", ["status"], registry=r)
        self.cap_rejections = Counter(
            "bandit_engine_cap_rejections", "Decisions where a cap masked offers or left nothing",
            ["cap"], registry=r,
        )
        self.latency = Histogram("bandit_engine_request_seconds", "Request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.background_failures = Counter(
            "bandit_engine_background_failures", "Failed runs of a worker's background tasks: "
            "sync (policies from the feedback log), expire (due reward windows), snapshot "
            "(policy checkpoints); each is retried at its next turn and the worker keeps deciding",
            ["task"], registry=r,
        )
        self.expired = Counter(
            "bandit_engine_expired_decisions", "Decisions whose reward window this process closed "
            "(default reward learned, reservation released)", registry=r,
        )
        r.register(_BudgetCollector(engine))

    def background_failed(self, task: str) -> None:
        self.background_failures.labels(task).inc()

    def observe_decision(self, d: Any) -> None:
        self.decisions.labels(d.channel, d.group, "offer" if d.offer_id else "none").inc()
        reason = d.reason or ""
        if "capped:" in reason or reason == "member_cap":
            caps = reason.split("capped:", 1)[-1] if "capped:" in reason else "member"
            for cap in caps.split(","):
                self.cap_rejections.labels(cap or "unknown").inc()

    def render(self) -> bytes:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            from prometheus_client import multiprocess

            r = CollectorRegistry()
            multiprocess.MultiProcessCollector(r)
            r.register(_BudgetCollector(self.engine))
            return generate_latest(r)
        return generate_latest(self.registry)
