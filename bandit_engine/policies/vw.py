"""Vowpal Wabbit ``--cb_explore_adf`` through ``vowpal_wabbit_next``.

One multi-line example per decision, namespaces keyed by their first letter::

    shared |U tier=gold visits:3.0 member.exposures:12.0 |M id=m-42    (|M only if member_id)
    |A id=spring-10 category=home discount:0.1 |H seen:2.0 redeemed:1.0  (|H only with history)
    |A id=summer-5 category=garden discount:0.05

``|A`` carries the offer id (so each offer gets its own weights through ``-q UA``) and its
features; ``|H`` the member x offer history. VW minimizes cost: reward r is learned as cost -r
(clipped into [0, 1] first for regcb/regcbopt, which need the matching cost range).

Speed, measured at 50 offers and ~30 context features: parsing 51 text lines costs 0.3-0.6 ms, so
parsed action examples without an ``|H`` part are cached per offer and reused across decisions
(VW leaves them as parsed; the model is identical to parsing every line, see the tests). The
public ``Workspace.predict_one``/``learn_one`` wrappers check every example's label type
through a C++ call (~150 µs at 50 actions); examples parsed by the workspace itself always have
its label type, so with vowpal-wabbit-next 0.7.0 (pinned) we call the native methods directly,
falling back to the public API if those internals are missing.

VW objects are not thread-safe: a policy instance must be used by one thread at a time (the
engine calls every policy under its lock).

>>> from bandit_engine.catalog import Offer
>>> offers = tuple(Offer(f"o{i}", channels=["email"]) for i in range(3))
>>> pol = VWPolicy(seed=1, explorer="epsilon", epsilon=0.1)
>>> s = Scoring("m1", {"tier": "gold"}, offers)
>>> for _ in range(50):
...     pol.learn(s, 1, 1 / 3, 1.0)
>>> pol.pmf(s, np.random.default_rng(0), floor=0.03).round(3)
array([0.042, 0.915, 0.042])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from vowpal_wabbit_next import TextFormatParser, Workspace, _core

from ..catalog import FeatureValue, Offer, is_finite_number, shown
from ..errors import InvalidArgument
from .base import Policy, Scoring


def _number(lo: float, hi: float, *, integer: bool = False) -> Callable[[str, object], str]:
    def check(name: str, value: object) -> str:
        ok = is_finite_number(value) and (isinstance(value, int) or not integer)
        if not ok or not (lo <= value <= hi):  # type: ignore[operator]
            kind = "an integer" if integer else "a number"
            raise InvalidArgument(
                f"vw: {name} must be {kind} in [{lo:g}, {hi:g}], got {shown(value)}"
            )
        return str(value) if integer else format(float(value), ".9g")  # type: ignore[arg-type]

    return check


_PROB = _number(0.0, 1.0)
_POS = _number(1e-9, 1e9)
_NONNEG = _number(0.0, 1e9)

# explorer -> (its VW flag, the value option that flag takes if any, {option: check})
_EXPLORERS: dict[str, tuple[str, str | None, dict[str, Callable[[str, object], str]]]] = {
    "squarecb": ("--squarecb", None, {"gamma_scale": _POS, "gamma_exponent": _NONNEG}),
    "epsilon": ("--epsilon", "epsilon", {"epsilon": _PROB}),
    "bag": ("--bag", "bag", {"bag": _number(1, 1000, integer=True), "epsilon": _PROB}),
    "cover": (
        "--cover",
        "cover",
        {"cover": _number(1, 1000, integer=True), "psi": _NONNEG, "epsilon": _PROB},
    ),
    "regcb": ("--regcb", None, {"mellowness": _POS}),
    "regcbopt": ("--regcbopt", None, {"mellowness": _POS}),
}
# Our defaults differ from VW's where VW's learned no better than uniform within 2 000
# decisions on the contract-test world (cover psi=1, regcb mellowness=0.1).
_DEFAULTS = {
    "epsilon": {"epsilon": 0.05},
    "bag": {"bag": 5},
    "cover": {"cover": 5, "psi": 0.1},
    "regcb": {"mellowness": 0.01},
}
_COST_RANGE = ("regcb", "regcbopt")  # need --cb_min_cost -1 --cb_max_cost 0 to learn at all
# ``extra_args``: learning options only, each with the kind of value it takes (None: a switch).
# Anything else is refused: a channel's policy comes over the HTTP API, and many of VW's options
# read or write files on the server (``-p`` truncates any file it names, ``--cache_file``,
# ``-f``, ``-d``, ``--readable_model``, ...) or set what the engine sets (seed, explorer).
_NUM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_WORD = re.compile(r"[A-Za-z0-9_:]{1,32}")
_EXTRA_OPTIONS: dict[str, re.Pattern[str] | None] = {
    "-l": _NUM, "--learning_rate": _NUM, "--power_t": _NUM, "--initial_t": _NUM,
    "--decay_learning_rate": _NUM, "--l1": _NUM, "--l2": _NUM, "-b": _NUM, "--bit_precision": _NUM,
    "--cb_type": _WORD, "--loss_function": _WORD, "--ignore": _WORD, "--ignore_linear": _WORD,
    "--keep": _WORD, "-q": _WORD, "--quadratic": _WORD, "--cubic": _WORD,
    "--noconstant": None, "--coin": None, "--sgd": None, "--adaptive": None, "--normalized": None,
    "--invariant": None, "--first_only": None,
}  # fmt: skip
MAX_BITS = 24  # -b / --bit_precision
_NAMESPACES = "UAHM"  # shared context, offer, member x offer history, member id

_ESCAPES = str.maketrans({"%": "%25", " ": "%20", "\t": "%09", "\n": "%0A", "\r": "%0D",
                          "|": "%7C", ":": "%3A"})  # fmt: skip


def _clean(text: str) -> str:
    """A feature name or value VW's text format reads as one token (injective escaping)."""
    return text.translate(_ESCAPES)


def feature_text(features: Mapping[str, FeatureValue], cache: dict[Any, str] | None = None) -> str:
    """``name=value`` for strings, ``name`` for true flags, ``name:number`` for numbers.

    ``cache`` (optional, owned by the caller) memoizes escaped names and string tokens.

    >>> feature_text({"tier": "gold", "visits": 3, "new": True, "old": False, "a b|c": "x:y"})
    'tier=gold visits:3.0 new a%20b%7Cc=x%3Ay'
    """
    if cache is None:
        cache = {}
    elif len(cache) > 100_000:
        cache.clear()
    parts = []
    for k, v in features.items():
        if isinstance(v, str):
            token = cache.get((k, v))
            if token is None:
                token = cache[(k, v)] = f"{_clean(k)}={_clean(v)}"
            parts.append(token)
            continue
        name = cache.get(k)
        if name is None:
            name = cache[k] = _clean(k)
        if isinstance(v, bool):
            if v:
                parts.append(name)
        else:
            x = float(v)
            if x != 0.0 and math.isfinite(x):
                parts.append(f"{name}:{x!r}")
    return " ".join(parts)


def _check_extra_args(args: Sequence[str]) -> None:
    """Every option a learning option of :data:`_EXTRA_OPTIONS` with a value of its kind."""
    tokens = [t for a in args for t in (a.split("=", 1) if a.startswith("--") else (a,))]
    i = 0
    while i < len(tokens):
        flag = tokens[i]
        if flag not in _EXTRA_OPTIONS:
            raise InvalidArgument(
                f"vw: extra_args may hold only the learning options {sorted(_EXTRA_OPTIONS)}, "
                f"each with its value; got {shown(flag, 40)}"
            )
        kind = _EXTRA_OPTIONS[flag]
        if kind is not None:
            value = tokens[i + 1] if i + 1 < len(tokens) else None
            if value is None or not kind.fullmatch(value):
                raise InvalidArgument(
                    f"vw: extra_args: {flag} needs a value, got {shown(value, 40)}"
                )
            if flag in ("-b", "--bit_precision") and not (
                value.isdigit() and 1 <= int(value) <= MAX_BITS
            ):  # fmt: skip
                raise InvalidArgument(
                    f"vw: extra_args: {flag} must be an integer in [1, {MAX_BITS}], got "
                    f"{shown(value, 40)} (each checkpoint serializes 2^bits weights under the "
                    "engine's lock: 0.1 s at 24 bits, 12 s at 30)"
                )
            i += 1
        i += 1


class VWPolicy(Policy):
    """Contextual bandit with action-dependent features, explored by one of VW's explorers."""

    family = "vw"
    uses_offer_context = True

    def __init__(
        self,
        *,
        seed: int = 0,
        explorer: str = "squarecb",
        interactions: Sequence[str] = ("UA",),
        member_id: bool = False,
        extra_args: Sequence[str] = (),
        **options: float,
    ) -> None:
        super().__init__(seed=seed)
        if explorer not in _EXPLORERS:
            raise InvalidArgument(
                f"vw: explorer must be one of {sorted(_EXPLORERS)}, got {explorer!r}"
            )
        flag, value_option, allowed = _EXPLORERS[explorer]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise InvalidArgument(
                f"vw: unknown option(s) {unknown} for explorer {explorer!r}; "
                f"it takes {sorted(allowed)}"
            )
        opts = {**_DEFAULTS.get(explorer, {}), **options}
        values = {k: allowed[k](k, v) for k, v in opts.items()}
        if isinstance(interactions, str) or not isinstance(interactions, Sequence):
            raise InvalidArgument(
                f"vw: interactions must be a list of namespace letters such as ['UA'], "
                f"got {interactions!r}"
            )
        for term in interactions:
            if (
                not isinstance(term, str)
                or not 2 <= len(term) <= 3
                or any(c not in _NAMESPACES for c in term)
            ):
                raise InvalidArgument(
                    f"vw: each interaction must be 2-3 letters of {_NAMESPACES!r} "
                    f"(U context, A offer, H history, M member), got {term!r}"
                )
        if not isinstance(member_id, bool):
            raise InvalidArgument(f"vw: member_id must be true or false, got {member_id!r}")
        if isinstance(extra_args, str) or not isinstance(extra_args, Sequence):
            raise InvalidArgument(f"vw: extra_args must be a list of strings, got {extra_args!r}")
        for a in extra_args:
            if not isinstance(a, str) or not a:
                raise InvalidArgument(f"vw: extra_args must be non-empty strings, got {a!r}")
        _check_extra_args(extra_args)
        self.explorer = explorer
        self.member_id = member_id
        terms = list(dict.fromkeys(interactions))
        if member_id and "MA" not in terms:
            terms.append("MA")
        self.interactions = tuple(terms)
        args = ["--cb_explore_adf", flag]
        if value_option is not None:
            args.append(values.pop(value_option))
        for k in sorted(values):
            args += [f"--{k}", values[k]]
        if explorer in _COST_RANGE:
            args += ["--cb_min_cost", "-1", "--cb_max_cost", "0"]
        for term in self.interactions:
            args += ["--interactions", term]
        args += [*extra_args, "--quiet"]
        self.args = tuple(args)  # without the seed: a snapshot carries its own
        self._ws = self._workspace([*args, "--random_seed", str(seed % 2**63)])
        self._cache_actions = True
        self._text: dict[Any, str] = {}  # escaped feature names and string tokens

    # workspace -------------------------------------------------------------------------------
    def _workspace(self, args: list[str], model: bytes | None = None) -> Workspace[Any]:
        try:
            ws: Workspace[Any] = Workspace(args, model_data=model)
        except RuntimeError as exc:  # VW reports bad options and corrupt models this way
            raise InvalidArgument(f"vw: VW rejected {' '.join(args)!r}: {exc}") from None
        native = getattr(ws, "_workspace", None)
        if native is not None and hasattr(_core, "_parse_line_text"):
            self._parse: Callable[[str], Any] = lambda text: _core._parse_line_text(native, text)
            self._predict: Callable[[list[Any]], Any] = native.predict_multi_ex_one
            self._update: Callable[[list[Any]], Any] = native.learn_multi_ex_one
        else:  # pragma: no cover - another vowpal-wabbit-next version
            self._parse = TextFormatParser(ws).parse_line
            self._predict, self._update = ws.predict_one, ws.learn_one
        self._actions: dict[str, tuple[Offer, Any]] = {}  # offer id -> (offer, parsed line)
        return ws

    def _action_line(self, offer: Offer, history: Mapping[str, float]) -> str:
        line = f"|A id={_clean(offer.offer_id)} {feature_text(offer.features, self._text)}"
        if history:
            line += f" |H {feature_text(history, self._text)}"
        return line

    def _examples(self, s: Scoring, label: tuple[int, float, float] | None = None) -> list[Any]:
        """The parsed multi-line example; ``label`` = (chosen index, cost, probability)."""
        parse = self._parse
        shared = f"shared |U {feature_text(s.context, self._text)}"
        if self.member_id:
            shared += f" |M id={_clean(s.member_id)}"
        out = [parse(shared)]
        cache = self._actions
        for i, (offer, history) in enumerate(zip(s.offers, s.offer_context, strict=True)):
            if label is not None and i == label[0]:
                line = self._action_line(offer, history)
                out.append(parse(f"{i}:{label[1]:.9g}:{label[2]:.9g} {line}"))
            elif history or not self._cache_actions:
                out.append(parse(self._action_line(offer, history)))
            else:
                hit = cache.get(offer.offer_id)
                if hit is None or (hit[0] is not offer and hit[0].features != offer.features):
                    hit = cache[offer.offer_id] = (offer, parse(self._action_line(offer, {})))
                out.append(hit[1])
        return out

    # hooks -----------------------------------------------------------------------------------
    def _distribution(self, s: Scoring) -> np.ndarray:
        k = len(s.offers)
        out = [0.0] * k
        for i, prob in self._predict(self._examples(s)):  # (index, probability), greedy first
            out[i] = max(prob, 0.0)
        total = sum(out)
        if not (total > 0.0 and math.isfinite(total)):
            return np.full(k, 1.0 / k)
        return np.array(out) / total

    def _learn(self, s: Scoring, chosen: int, probability: float, reward: float) -> None:
        if self.explorer in _COST_RANGE:
            reward = min(max(reward, 0.0), 1.0)
        self._update(self._examples(s, (chosen, -reward, probability)))

    # state -----------------------------------------------------------------------------------
    def _get_state(self) -> dict[str, Any]:
        return {"args": list(self.args), "model": self._ws.serialize()}

    def _set_state(self, state: Mapping[str, Any]) -> None:
        if list(state["args"]) != list(self.args):
            raise InvalidArgument(
                f"vw: snapshot was trained with {state['args']!r}, this policy uses "
                f"{list(self.args)!r}"
            )
        # the model carries its seed (and --bag rewrites it), so it is not passed again; VW
        # resets its loss counters on load unless told not to, and they are part of the model
        args = [*self.args, "--preserve_performance_counters"]
        self._ws = self._workspace(args, bytes(state["model"]))


FAMILIES: dict[str, Callable[..., Policy]] = {"vw": VWPolicy}

__all__ = ["FAMILIES", "VWPolicy", "feature_text"]
