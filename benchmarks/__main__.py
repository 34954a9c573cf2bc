"""``make bench``: every benchmark, each against a floor measured in the same run.

    python -m benchmarks [--quick] [--only core,http,simulation,ope]

Prints one table per suite and writes ``benchmarks/results/latest.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
from pathlib import Path

SUITES = ("core", "http", "simulation", "ope")


def print_table(name: str, rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:,.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"\n## {name}")
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--only", default=",".join(SUITES))
    args = ap.parse_args()
    results = {"machine": platform.platform(), "python": platform.python_version(), "suites": {}}
    for name in args.only.split(","):
        try:
            mod = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as exc:
            print(f"\n## {name}: not available ({exc})")
            continue
        t0 = time.perf_counter()
        rows = mod.run(quick=args.quick)
        print_table(f"{name} ({time.perf_counter() - t0:.0f} s)", rows)
        results["suites"][name] = rows
    out = Path(__file__).parent / "results" / "latest.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
