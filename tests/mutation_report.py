"""Kill rate per module from mutmut's results: `python tests/mutation_report.py` after `mutmut run` (make mutate).

Reads mutants/**/*.py.meta (mutmut 3's per-file results). Counts per module: killed (a test failed, or the mutant
timed out), survived, no tests (no selected fast test calls the function), not yet run. The kill rate is
killed / (killed + survived); equivalent survivors are listed in docs/TESTING.md and subtracted there.
    --survivors   also print the name of every surviving mutant (`mutmut show NAME` shows its diff)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

KILLED = {1, 3, 24, -24, 36, 152, 255}  # a failing test, pytest's internal error, a timeout (mutmut's own mapping)
SURVIVED = {0}
NO_TESTS = {5, 33}


def main(argv: list[str]) -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no results under mutants/; run `make mutate` first", file=sys.stderr)
        return 1
    print(f"{'module':48} {'killed':>6} {'survived':>8} {'no tests':>8} {'not run':>7} {'kill rate':>9}")
    survivors = []
    for meta in metas:
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        if not codes:
            continue
        module = str(meta.relative_to("mutants")).removesuffix(".py.meta")
        killed = sum(c in KILLED for c in codes.values())
        alive = [k for k, c in codes.items() if c in SURVIVED]
        no_tests = sum(c in NO_TESTS for c in codes.values())
        not_run = sum(c is None for c in codes.values())
        rate = f"{100 * killed / (killed + len(alive)):.1f} %" if killed + alive.__len__() else "-"
        print(f"{module:48} {killed:6} {len(alive):8} {no_tests:8} {not_run:7} {rate:>9}")
        survivors += alive
    if "--survivors" in argv:
        print("\n".join(["", "survivors:"] + sorted(survivors)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
