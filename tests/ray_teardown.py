"""`shutdown_ray()`: what every test that started a local Ray calls instead of a bare `ray.shutdown()`.

A Ray Data iterator left before its end (`next(iter(ds.iter_torch_batches(...)))`) is closed when it is garbage
collected, and its formatting / executor threads keep calling into Ray for a moment after that. If `ray.shutdown()`
comes first, Ray's C++ core worker ends the whole process with exit status 1 ("The core worker has already been
shutdown ... The process will exit") while pytest's fd capture holds the message: the suite dies with no summary.
That is how CI died after 28 tests (test_preprocess.py's module teardown). So: collect the abandoned iterators,
wait for those threads, then shut down.
"""
from __future__ import annotations

import gc
import sys
import threading
import time

# Thread names Ray Data 2.60 gives its iteration and execution threads (make_async_gen, StreamingExecutor, the
# metadata prefetcher). The block "Prefetcher" idles on a queue and is left alone.
RAY_DATA_THREADS = ("iter_threaded", "StreamingExecutor", "ray-data-")


def ray_data_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.is_alive() and t.name.startswith(RAY_DATA_THREADS)]


def shutdown_ray(timeout_s: float = 60.0) -> None:
    """gc.collect() (closes abandoned iterators while Ray is still up), wait up to timeout_s for Ray Data's threads
    to end, then ray.shutdown(). Threads still alive at the deadline are named on stderr before shutting down."""
    import ray

    gc.collect()
    deadline = time.monotonic() + timeout_s
    while (alive := ray_data_threads()) and time.monotonic() < deadline:
        alive[0].join(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
    if alive:
        print(f"shutdown_ray: Ray Data threads still running after {timeout_s:.0f} s: "
              f"{[t.name for t in alive]}", file=sys.stderr, flush=True)
    ray.shutdown()
