"""MiniCPM-V 4.6 under DeepSpeed ZeRO-2 on CPU, 2 gloo processes, one with a text-only batch and one with images.

transformers' 4.6 model skips its vision tower when a batch has no `pixel_values`; `forward_logits` then runs a
zero-weight dummy crop inside the forward, so every trained tensor (LoRA, the connector copies) gets a gradient on
every rank and the ranks' gradient reductions match. ZeRO-3 with ranks of different crop counts:
test_v4_zero3_mixed.py (models/zero3.py).

Run: flock /tmp/raytest.lock python -m pytest tests/integration/test_v4_zero2_mixed.py -q   (~1 min on 2 cores)
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(rank: int, ckpt: str) -> dict:
    from PIL import Image

    from raytune_minicpmv.models.processor4 import load_processor4

    proc = load_processor4(ckpt)
    proc.image_processor.scale_resolution, proc.image_processor.max_slice_nums = 112, 2
    if rank == 0:
        batch = dict(proc(text=["<|im_start|>user\nHow many sides has a square?<|im_end|>\n<|im_start|>assistant\n4"]))
    else:
        batch = dict(proc(text=["<|im_start|>user\n<|image_pad|>Colour?<|im_end|>\n<|im_start|>assistant\nred"],
                          images=[Image.new("RGB", (200, 90), (220, 20, 20))]))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -4:-1] = batch["input_ids"][0, -3:]
    batch["labels"] = labels
    return batch


def _worker(rank: int, world: int, port: int, ckpt: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    import deepspeed
    from raytune_minicpmv.config import LoraConfig, TrainableConfig
    from raytune_minicpmv.models import apply_trainable_policy, compute_loss, load_model
    from raytune_minicpmv.models.forward import forward_logits

    torch.manual_seed(0)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 2},
                 "bf16": {"enabled": False}, "gradient_clipping": 1.0}
    model = apply_trainable_policy(load_model(ckpt, dtype=torch.float32), TrainableConfig(),
                                   LoraConfig(r=4, alpha=8, dropout=0.0))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
    batch = _batch(rank, ckpt)
    losses = []
    for _ in range(2):
        loss_sum, n_tokens = compute_loss(forward_logits(engine, batch, "minicpmv4_6"), batch["labels"])
        engine.backward(loss_sum / n_tokens)
        engine.step()
        losses.append(float(loss_sum / n_tokens))
    engine.eval()
    with torch.no_grad():
        eval_ok = bool(torch.isfinite(forward_logits(engine, batch, "minicpmv4_6")).all())
    merger = next(p for n, p in model.named_parameters() if "model.merger.modules_to_save" in n and p.requires_grad)
    merger_sum = float(merger.sum())
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"losses": losses, "eval_ok": eval_ok, "merger_sum": merger_sum}, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(400)
def test_v46_zero2_text_only_rank_next_to_image_rank(tmp_path, tiny46):
    mp.spawn(_worker, args=(2, _free_port(), str(tiny46), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["eval_ok"] and r1["eval_ok"]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (r0, r1))
    assert r0["losses"] != r1["losses"]  # different batches
    assert r0["merger_sum"] == r1["merger_sum"]  # the stepped, gathered connector copy agrees across ranks
