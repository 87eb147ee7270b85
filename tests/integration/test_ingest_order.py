"""The train stream's order is the data's order, whatever order Ray Data's tasks finish in.

A resumed run skips the micro-batches it had consumed (train/worker.micro_batches), and two runs of one config
should see one sequence of batches. Both hold only if the shard yields rows in a fixed order. Ray Data's default
(`preserve_order=False`) hands out blocks as their tasks finish. On the 16-core GPU machine three runs of one
config saw three different windows of samples (646-692 tokens per sample over the same steps,
docs/PERFORMANCE.md "Row-major vision residuals"). The trainer's ingest options (`trainer.ingest_config`) keep
the order.

The test: a pipeline whose first block's task waits for another block's task to finish, split for one worker
through the product's DataConfig, exactly as Ray Train does (`DataConfig.configure`).

Run: pytest tests/integration/test_ingest_order.py   (~30 s)
"""
from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow


def _shard_ids(ray_session, data_config, gate) -> list[int]:
    def first_block_last(batch):  # nested: pickled by value for the Ray workers
        # the first block's task waits until another block's task has finished (a file each, in `gate`), so it
        # always completes after one: the completion order differs from the data's order
        first = int(batch["id"][0])
        deadline = time.time() + 60
        while first == 0 and not any(gate.glob("done_*")) and time.time() < deadline:
            time.sleep(0.05)
        if first == 0:
            time.sleep(1.0)  # well after that block's output reached the executor
        (gate / f"done_{first}").touch()
        return batch

    ds = ray_session.data.range(60, override_num_blocks=6).map_batches(first_block_last, batch_size=None,
                                                                        num_cpus=0.25)
    shard = data_config.configure({"train": ds}, world_size=1, worker_handles=None, worker_node_ids=None)[0]["train"]
    return [int(i) for b in shard.iter_batches(batch_size=5, batch_format="numpy") for i in b["id"]]


def test_the_train_shard_keeps_the_datas_order(ray_session, tmp_path):
    from raytune_minicpmv.train.trainer import ingest_config

    assert _shard_ids(ray_session, ingest_config(), tmp_path) == list(range(60))


def test_ray_datas_default_ingest_reorders_this_pipeline(ray_session, tmp_path):
    """Control: with Ray Train's default options the same pipeline comes out in completion order."""
    from ray.train import DataConfig

    ids = _shard_ids(ray_session, DataConfig(), tmp_path)
    assert sorted(ids) == list(range(60)) and ids != list(range(60))
