"""tests/ray_teardown.shutdown_ray: a Ray Data iterator abandoned after its first batch, then the test's Ray shut
down, must not end the process (exit 1, no pytest summary: how CI died after 28 tests). Run in a fresh interpreter,
as the suite's pytest process would be the one to die."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import gc, time
import ray
from tests.ray_teardown import shutdown_ray

ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
ds = ray.data.range(2000, override_num_blocks=20).map_batches(lambda b: b, batch_size=10)
for _ in range(2):
    it = iter(ds.iter_torch_batches(batch_size=4))
    next(it)
    cycle = [it]
    cycle.append(cycle)  # reachable only through a cycle: closed by the garbage collector, not at `del`
    del it, cycle
shutdown_ray()
time.sleep(3)  # the threads that call into Ray after the shutdown do so within a second or two
print("SURVIVED", flush=True)
"""


def test_an_abandoned_iterator_does_not_end_the_process_at_shutdown():
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0 and "SURVIVED" in p.stdout, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
