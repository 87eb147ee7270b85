"""What the cluster plumbing costs: starting a 2-node Ray (token auth, Jobs server) on this machine, a job round trip
through `raytune-minicpmv submit --follow`, and the shared-storage check, measured on the cluster of
tests/integration/test_multinode.py.

    .venv/bin/python benchmarks/jobs_overhead.py [--repeats 3]

Prints one JSON object (seconds); docs/PERFORMANCE.md records a run. A job round trip = package and upload the
working dir, start the job supervisor and the driver process on the head, run, stream the logs, read the status.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.test_multinode import _cli, two_node_cluster  # noqa: E402


def _timed_job(c, *command: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    r = _cli(c, "submit", "--follow", "--", *command)
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"job {command} failed:\n{r.stdout}\n{r.stderr}")
    return elapsed, r.stdout + r.stderr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    with two_node_cluster() as c:
        started = time.perf_counter() - t0
        trivial = [_timed_job(c, "python", "-c", "pass")[0] for _ in range(args.repeats)]
        # The real entry of every stage: join the cluster from the job driver, then check storage on both nodes.
        check_code = ("from raytune_minicpmv.config import load_config; from raytune_minicpmv.cluster.ray_session import "
                      "init_ray, check_storage; import logging; logging.basicConfig(level='INFO'); "
                      f"cfg = load_config(None, ['run.storage_path={c.shared}/runs'], check_paths=False); "
                      "init_ray(cfg); check_storage(cfg.run)")
        checks, joins = [], []
        for _ in range(args.repeats):
            elapsed, out = _timed_job(c, "python", "-c", check_code)
            joins.append(elapsed)
            checks.append(float(re.search(r"shared by all 2 nodes \(([\d.]+) s\)", out)[1]))
    print(json.dumps({
        "cluster_start_s": round(started, 1),
        "trivial_job_round_trip_s": {"median": round(statistics.median(trivial), 2), "all": [round(x, 2) for x in trivial]},
        "join_and_storage_check_job_s": {"median": round(statistics.median(joins), 2)},
        "storage_check_s": {"median": round(statistics.median(checks), 2), "all": checks},
    }, indent=2))


if __name__ == "__main__":
    main()
