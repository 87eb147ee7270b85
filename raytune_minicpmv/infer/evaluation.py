"""Generation metrics on the eval split inside the Train workers (`eval.generation_metrics`), next to eval loss.

    scorer = GenerationScorer(cfg, world)               # once per worker: tokenizer, metric functions, settings
    metrics = scorer.score(engine, eval_shard, device)  # {"eval_token_f1": 0.41, ...} on every rank

Each rank generates answers for the first ceil(eval.generation_max_samples / world) rows of its eval shard (the
preprocessed rows, cut before their last assistant turn by `prompts.prompt_of`: the same prompt the loss saw), scores
them against the cut answers and the sums are all-reduced, so every rank reports the same means. The ranks agree
before each generate call that all still have rows, and under ZeRO-3 `synced_gpus` keeps their forwards in step
(every forward gathers the partitioned weights collectively), so uneven shards and answer lengths never hang.
4.6 / 4.7 rows (ROW_SCHEMA4) are cut the same way (prompts4.prompt4_of) and decoded by their family's `generate`.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from .generation import GenerationSettings, decode, generate, stop_token_ids, to_device
from .metrics import resolve_metrics
from .prompts import prompt_batch, prompt_of


class GenerationScorer:
    def __init__(self, cfg, world: int):
        from ..models.registry import FAMILIES
        from ..models.tokenizer_loading import load_tokenizer

        self.metrics = resolve_metrics(list(cfg.eval.generation_metrics))
        self.tok = load_tokenizer(cfg.data.tokenizer_path or cfg.model.path)  # decoding and stop ids only
        # 4.6 / 4.7: the model gets the processor's downsample mode, as the training forward does
        fam = FAMILIES.get(cfg.model.family)
        self.downsample_mode = cfg.model.downsample_mode if fam is not None and fam.hf_native else None
        self.stops = stop_token_ids(self.tok)
        self.settings = GenerationSettings.from_config(cfg.generate, max_new_tokens=cfg.eval.generation_max_new_tokens,
                                                       seed=cfg.generate.seed if cfg.generate.seed is not None
                                                       else cfg.run.seed)
        self.per_rank = math.ceil(cfg.eval.generation_max_samples / world)
        self.batch_size = min(cfg.eval.generation_batch_size, self.per_rank)
        self.world = world

    @torch.no_grad()
    def score(self, model, shard, device, all_reduce: Callable, say: Callable[[str], None] = lambda m: None
              ) -> dict[str, float]:
        """Mean of every metric over the generated samples of all ranks, as {"eval_<name>": value}; {} when no rank
        has an eval row. `all_reduce(tensor, op=None)` sums (or applies op) across ranks."""
        import torch.distributed as dist

        from .generation import unwrap

        t0 = time.perf_counter()
        synced = self.world > 1 and bool(getattr(unwrap(model), "zero3_partitioned", False))
        sums = torch.zeros(len(self.metrics) + 1, dtype=torch.float64)  # metric sums, sample count
        rows = _rows(shard, self.batch_size)
        done = 0
        while done < self.per_rank:
            batch = next(rows, None)
            have = all_reduce(torch.tensor([0 if batch is None else 1], dtype=torch.int64), op=dist.ReduceOp.MIN)
            if not have.item():
                break
            batch = batch[:self.per_rank - done]
            prompts = [prompt_of(r) for r in batch]
            new = generate(model, to_device(prompt_batch(prompts, downsample_mode=self.downsample_mode), device),
                           self.settings, self.stops, synced_gpus=synced)
            for p, ids in zip(prompts, new):
                pred, ref = decode(self.tok, ids), decode(self.tok, p.reference_ids)
                sums += torch.tensor([float(fn(pred, ref)) for fn in self.metrics.values()] + [1.0],
                                     dtype=torch.float64)
            done += len(batch)
        sums = all_reduce(sums)
        n = float(sums[-1])
        if n == 0:
            return {}
        say(f"generation metrics on {int(n)} eval samples in {time.perf_counter() - t0:.1f} s")
        return {f"eval_{name}": float(s / n) for name, s in zip(self.metrics, sums[:-1])}


def _rows(shard, batch_size: int):
    """Rows of the eval shard as dicts, `batch_size` at a time (skipped tombstones never reach a shard)."""
    if shard is None:
        return iter(())

    def gen():
        for cols in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
            n = len(cols["input_ids"])
            yield [{k: v[i] for k, v in cols.items()} for i in range(n)]
    return gen()


def maybe_scorer(cfg, world: int) -> Optional[GenerationScorer]:
    return GenerationScorer(cfg, world) if cfg.eval.generation_metrics else None
