"""Thompson's empirical-Bayes pooled prior (``pool_strength``): parameter checks, the prior it
gives an arm, exact replay from a snapshot, and no change at all when it is off."""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pytest

from bandit_engine.catalog import Offer
from bandit_engine.errors import InvalidArgument
from bandit_engine.exploration import event_rng
from bandit_engine.policies import registry
from bandit_engine.policies.base import Scoring
from bandit_engine.policies.thompson import Thompson
from tests.test_policy_contract import FLOOR, OFFERS, Case, make, play, scoring, world_result

GRID = 64  # pseudo-counts are rounded to 1/64 of an observation

BAD_PARAMS: list[tuple[dict[str, Any], str]] = [
    ({"pool_strength": -1}, r"pool_strength must be a number in \[0, 1e\+06\], got -1"),
    ({"pool_strength": math.nan}, r"pool_strength .*got nan"),
    ({"pool_strength": math.inf}, r"pool_strength .*got inf"),
    ({"pool_strength": 2e6}, r"pool_strength .*got 2000000\.0"),
    ({"pool_strength": "5"}, r"pool_strength .*got '5'"),
    ({"pool_strength": True}, r"pool_strength .*got True"),
    ({"pool_strength": None}, r"pool_strength .*got None"),
]


@pytest.mark.parametrize("params,message", BAD_PARAMS, ids=[str(p) for p, _ in BAD_PARAMS])
def test_bad_pool_strength_is_rejected(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        registry.make_policy({"family": "thompson", "params": params}, seed=0)


@pytest.mark.parametrize("value", [0, 0.0, 2, 7.5, 1e6])
def test_good_pool_strength_is_accepted(value: float) -> None:
    pol = registry.make_policy({"family": "thompson", "params": {"pool_strength": value}})
    assert pol.pool_strength == float(value)  # type: ignore[attr-defined]


def seg(name: str, offers: tuple[Offer, ...] = OFFERS) -> Scoring:
    return Scoring("m", {"segment": name}, offers)


def teach(pol: Thompson, segment: str, chosen: int, successes: int, n: int) -> None:
    for i in range(n):
        pol.learn(seg(segment), chosen, 0.2, float(i < successes))


def pooled(m: float) -> Thompson:
    return Thompson(seed=5, segment_by=["segment"], pool_strength=m)


def column(pol: Thompson, segment: str, index: int) -> np.ndarray:
    return pol._draws(seg(segment), event_rng(0, "x"))[:, index]


def test_an_unseen_arm_starts_from_the_offers_pooled_rate() -> None:
    pol, flat = pooled(10.0), Thompson(seed=5, segment_by=["segment"])
    for p in (pol, flat):
        teach(p, "a", 1, 10, 80)  # 12.5 %
        teach(p, "b", 1, 30, 80)  # 37.5 %
    # segment c never saw o1: 10 pseudo-observations at the pooled 25 % on the flat Beta(1, 1)
    assert pol.posterior("o1", {"segment": "c"}) == (3.5, 8.5)
    assert flat.posterior("o1", {"segment": "c"}) == (1.0, 1.0)
    assert column(pol, "c", 1).mean() == pytest.approx(3.5 / 12.0, abs=0.02)
    assert column(flat, "c", 1).mean() == pytest.approx(0.5, abs=0.04)
    # an offer nobody learned keeps the flat prior
    assert pol.posterior("o3", {"segment": "c"}) == (1.0, 1.0)
    assert column(pol, "c", 3).mean() == pytest.approx(0.5, abs=0.04)


def test_a_learned_arm_is_shrunk_toward_the_other_segments_only() -> None:
    pol = pooled(10.0)
    teach(pol, "a", 1, 10, 80)
    teach(pol, "b", 1, 30, 80)
    # leave-one-out: a's prior is b's 37.5 %, b's prior is a's 12.5 %, each 10 pseudo-obs
    assert pol.posterior("o1", {"segment": "a"}) == (1 + 10 + 3.75, 1 + 70 + 6.25)
    assert pol.posterior("o1", {"segment": "b"}) == (1 + 30 + 1.25, 1 + 50 + 8.75)
    assert column(pol, "a", 1).mean() == pytest.approx(14.75 / 92.0, abs=0.01)
    assert column(pol, "b", 1).mean() == pytest.approx(32.25 / 92.0, abs=0.015)


def test_pseudo_counts_never_exceed_the_pooled_data_and_are_rounded() -> None:
    pol = pooled(20.0)
    teach(pol, "a", 2, 1, 4)  # 4 observations, 1 success
    assert pol.posterior("o2", {"segment": "z"}) == (2.0, 4.0)  # min(20, 4) pseudo-obs at 1/4
    pol = pooled(2.5)
    teach(pol, "a", 2, 1, 4)
    assert pol.posterior("o2", {"segment": "z"}) == (1.625, 2.875)  # 2.5 pseudo-obs at 1/4
    pol = pooled(20.0)
    teach(pol, "a", 2, 1, 3)  # the mean is rounded to 1/64: 21/64 for 1/3
    assert pol.posterior("o2", {"segment": "z"}) == pytest.approx(
        (1 + 3 * 21 / 64, 1 + 3 * 43 / 64)
    )
    pol = pooled(0.004)  # rounds to no pseudo-observation at all: the flat prior
    teach(pol, "a", 2, 1, 3)
    assert pol.posterior("o2", {"segment": "z"}) == (1.0, 1.0)


def test_the_shared_prior_bank_follows_later_learning() -> None:
    pol = pooled(5.0)
    before = column(pol, "q", 0).copy()  # the shared prior bank of o0, flat
    np.testing.assert_array_equal(before, column(Thompson(seed=5, segment_by=["segment"]), "q", 0))
    teach(pol, "a", 0, 0, 50)  # o0 never redeems in a
    after = column(pol, "q", 0)
    assert pol.posterior("o0", {"segment": "q"}) == pytest.approx((1.0, 6.0))
    assert after.mean() < before.mean() - 0.2


def _restored(pol: Thompson, params: dict[str, Any]) -> Thompson:
    fresh = make(Case("thompson", params))
    fresh.restore(pol.serialize())
    assert isinstance(fresh, Thompson)
    return fresh


@pytest.mark.parametrize("m", [1.0, 5.0, 20.0])
def test_snapshot_plus_replay_gives_identical_pmfs_and_banks(m: float) -> None:
    params = {"segment_by": ["segment"], "pool_strength": m}
    pol = make(Case("thompson", params))
    assert isinstance(pol, Thompson)
    play(pol, 300)
    fresh = _restored(pol, params)
    for t in range(300, 310):  # including the shared prior banks, built after the restore
        s = scoring(t)
        np.testing.assert_array_equal(
            pol.pmf(s, event_rng(2, f"r{t}"), FLOOR), fresh.pmf(s, event_rng(2, f"r{t}"), FLOOR)
        )
    learned = sorted(pol._learned_rows())
    assert [pol._keys[r] for r in learned] == [
        fresh._keys[r] for r in sorted(fresh._learned_rows())
    ]
    np.testing.assert_array_equal(
        pol._bank[:, learned], fresh._bank[:, sorted(fresh._learned_rows())]
    )
    # snapshot + the log's tail == never restarted
    play(pol, 200, start=310)
    play(fresh, 200, start=310)
    for t in range(600, 620):
        s = scoring(t)
        np.testing.assert_array_equal(
            pol.pmf(s, event_rng(3, f"r{t}"), FLOOR), fresh.pmf(s, event_rng(3, f"r{t}"), FLOOR)
        )
    assert pol.serialize() == fresh.serialize()
    # and a third generation from the replayed one
    again = _restored(fresh, params)
    for t in range(600, 610):
        s = Scoring("m", {"segment": "never-seen"}, OFFERS)
        np.testing.assert_array_equal(
            pol.pmf(s, event_rng(4, f"r{t}"), FLOOR), again.pmf(s, event_rng(4, f"r{t}"), FLOOR)
        )


def test_pooling_changes_the_banks_but_not_the_snapshot_format() -> None:
    flat, pool = Thompson(seed=5, segment_by=["segment"]), pooled(10.0)
    for p in (flat, pool):
        teach(p, "a", 1, 10, 100)
        teach(p, "b", 1, 30, 100)
        teach(p, "b", 2, 3, 10)
    assert flat.serialize() == pool.serialize()  # the same learned state, the same bytes
    for name in ("a", "b", "c"):
        assert not np.array_equal(column(flat, name, 1), column(pool, name, 1))
    # a snapshot written with pooling restores into a flat policy and back
    other = Thompson(seed=5, segment_by=["segment"])
    other.restore(pool.serialize())
    np.testing.assert_array_equal(column(other, "a", 1), column(flat, "a", 1))
    back = pooled(10.0)
    back.restore(other.serialize())
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(column(back, name, 1), column(pool, name, 1))


def _reference_bank(pol: Thompson, segment: str, offer_id: str) -> np.ndarray:
    """The documented bank of a flat-prior arm, rebuilt independently of the policy's code."""
    alpha, beta = pol.posterior(offer_id, {"segment": segment})
    row = pol._rows[f'["{segment}"]'][offer_id]
    n = int(pol._updates[row])
    key = f'{pol.seed % 2**64}|["{segment}"]|{offer_id}|{n}'.encode()
    h = hashlib.blake2b(key, digest_size=32).digest()
    gen = np.random.Generator(np.random.PCG64(0))
    gen.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {
            "state": int.from_bytes(h[:16], "little"),
            "inc": int.from_bytes(h[16:], "little") | 1,
        },
        "has_uint32": 0,
        "uinteger": 0,
    }
    return gen.beta(alpha, beta, size=pol.propensity_draws)


@pytest.mark.parametrize("params", [{}, {"pool_strength": 0}, {"pool_strength": 0.0}])
def test_pooling_off_leaves_the_banks_byte_identical(params: dict[str, Any]) -> None:
    pol = make(Case("thompson", {"segment_by": ["segment"], **params}))
    default = make(Case("thompson", {"segment_by": ["segment"]}))
    assert isinstance(pol, Thompson)
    play(pol, 300)
    play(default, 300)
    assert pol._bank[:, : pol._size].tobytes() == default._bank[:, : default._size].tobytes()  # type: ignore[attr-defined]
    assert pol.serialize() == default.serialize()
    for segment, offers in pol._rows.items():
        name = segment[2:-2]
        for oid, row in offers.items():
            assert pol._bank[:, row].tobytes() == _reference_bank(pol, name, oid).tobytes()


def test_pooled_thompson_still_learns_the_easy_world() -> None:
    _, uniform = world_result(Case("uniform", learns=False))
    _, total = world_result(Case("thompson", {"segment_by": ["segment"], "pool_strength": 5}))
    assert total >= 1.2 * uniform
