"""MiniCPM-V 4.6 under DeepSpeed ZeRO-3 on CPU, 2 gloo processes whose micro-batches differ in crop count.

transformers' connector (`model.merger`) runs its MLPs once per crop; under ZeRO-3 each module call all-gathers the
module's weights, so without models/zero3.py (the connector as a ZeRO-3 leaf module, gathered once per forward)
rank 0 with 3 crops and rank 1 with 5 crops issue different numbers of collectives and the run crashes with a gloo
size mismatch or hangs (the timeout fails the test). Step 2 gives rank 0 a text-only micro-batch next to rank 1's
4 crops (forward_logits' dummy crop keeps the vision side in step).

Both ranks build the engine the way a training worker does (train.worker.build_engine: the model loaded under
zero.Init, LoRA on the LLM, the connector trained, the vision tower frozen) and run train.worker.train_step. The
same three steps run under ZeRO-2 in the same processes: the losses of every step must agree (step 1 checks the
forward on partitioned weights, steps 2 and 3 that the leaf module's gradients were reduced and applied like
ZeRO-2's) and fall.

Run: flock /tmp/raytest.lock python -m pytest tests/integration/test_v4_zero3_mixed.py -q   (~1 min on 2 cores)
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow
# (rank 0, rank 1) image sizes per step; None = text only. With scale_resolution 112 and max_slice_nums 4 the
# tiny processor cuts (200, 90) into 3 crops, (300, 300) into 5, (400, 150) into 4.
STEPS = [((200, 90), (300, 300)), (None, (400, 150)), ((200, 90), (300, 300))]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch(proc, size) -> dict:
    from PIL import Image

    if size is None:
        batch = dict(proc(text=["<|im_start|>user\nHow many sides has a square?<|im_end|>\n<|im_start|>assistant\n4"]))
    else:
        batch = dict(proc(text=["<|im_start|>user\n<|image_pad|>Colour?<|im_end|>\n<|im_start|>assistant\nred"],
                          images=[Image.new("RGB", size, (220, 20, 20))]))
    labels = torch.full_like(batch["input_ids"], -100)
    labels[0, -4:-1] = batch["input_ids"][0, -3:]
    batch["labels"] = labels
    return batch


def _run(stage: int, ckpt: str, rank: int, mode: str, llm: str) -> dict:
    from raytune_minicpmv.config import config_from_dict
    from raytune_minicpmv.models.processor4 import load_processor4
    from raytune_minicpmv.train.worker import build_engine, train_step

    cfg = config_from_dict({
        "model": {"family": "minicpmv4_6", "path": ckpt, "dtype": "fp32", "gradient_checkpointing": False,
                  "downsample_mode": mode},
        "trainable": {"llm": llm, "resampler": "full", "vision": "frozen"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "optim": {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"},
        "train": {"max_steps": len(STEPS), "micro_batch_size": 1},
        # threshold 0: every tensor partitioned (the default keeps this tiny model's tensors whole on each rank)
        "deepspeed": {"zero_stage": stage, "param_persistence_threshold": 0},
        "scaling": {"num_workers": 2, "use_gpu": False}}, check_paths=False)
    engine, model = build_engine(cfg)
    partitioned = all(p.ds_tensor.numel() < p.ds_numel for p in model.parameters() if hasattr(p, "ds_numel")
                      and p.ds_numel > 1) and any(hasattr(p, "ds_numel") for p in model.parameters())
    proc = load_processor4(ckpt, downsample_mode=mode)
    proc.image_processor.scale_resolution, proc.image_processor.max_slice_nums = 112, 4
    batches = [_batch(proc, sizes[rank]) for sizes in STEPS]
    losses, crops = [], [0 if b.get("target_sizes") is None else len(b["target_sizes"]) for b in batches]
    it, norms, sums = iter(batches), [], []
    for _ in STEPS:
        loss_sum, counts, *_ = train_step(engine, it, cfg, world=2)
        losses.append(float(loss_sum) / max(float((batches[len(losses)]["labels"] != -100).sum()), 1.0))
        norms.append(float(engine.get_global_grad_norm()))
        sums.append(_trained_sums(model))
    return {"losses": losses, "crops": crops, "partitioned": partitioned, "grad_norms": norms, "sums": sums}


def _trained_sums(model) -> dict:
    """Per trained part, the sum of |w| of the full (gathered under ZeRO-3) tensors."""
    import deepspeed

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {}
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        for n, p in named:
            part = "merger" if ".merger." in n else "vit_merger" if "vit_merger" in n else "lora"
            out[part] = out.get(part, 0.0) + float(p.detach().double().abs().sum())
    return out


def _worker(rank: int, world: int, port: int, ckpt: str, out_dir: str, mode: str, llm: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    out = {f"zero{stage}": _run(stage, ckpt, rank, mode, llm) for stage in (2, 3)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("mode,llm", [("16x", "lora"), pytest.param("4x", "lora", marks=pytest.mark.long)])
def test_v46_zero3_ranks_with_different_crop_counts_train_like_zero2(tmp_path, tiny46, mode, llm):
    """16x + LoRA: the defaults. 4x skips the vision tower's window merger (trained, unused there)."""
    mp.spawn(_worker, args=(2, _free_port(), str(tiny46), str(tmp_path), mode, llm), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["zero3"]["crops"] == [3, 0, 3] and r1["zero3"]["crops"] == [5, 4, 5]
    assert r0["zero3"]["partitioned"] and r1["zero3"]["partitioned"]  # ZeRO-3 really sharded every tensor
    for r in (r0, r1):
        z3, z2 = torch.tensor(r["zero3"]["losses"]), torch.tensor(r["zero2"]["losses"])
        assert torch.isfinite(z3).all()
        assert torch.allclose(z3, z2, rtol=1e-5, atol=0), (z3, z2)  # step 1 the forward, steps 2-3 the updates
        # the reduced gradients (their global norm, before clipping) and the stepped weights of each trained part
        assert torch.allclose(torch.tensor(r["zero3"]["grad_norms"]), torch.tensor(r["zero2"]["grad_norms"]),
                              rtol=1e-5, atol=0)
        for s3, s2 in zip(r["zero3"]["sums"], r["zero2"]["sums"]):
            assert s3.keys() == s2.keys() and "merger" in s2 and ("lora" in s2) == (llm == "lora")
            assert all(abs(s3[k] - s2[k]) <= 1e-6 * s2[k] for k in s2), (s3, s2)
    assert r0["zero3"]["losses"][2] < r0["zero3"]["losses"][0]  # the same batch again after two steps: it trains
    assert r1["zero3"]["losses"][2] < r1["zero3"]["losses"][0]
