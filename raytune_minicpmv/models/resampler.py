"""The resampler: Q learned queries cross-attend to one crop's vision features → `[Q, D]` LLM-space tokens.

State-dict names match the remote code (`query`, `kv_proj`, `attn.in_proj_{weight,bias}`, `attn.out_proj.*`,
`ln_q`, `ln_kv`, `ln_post`, `proj`). Keys get a 2D sin-cos position embedding of the crop's (h, w) patch grid
(MAE recipe); queries get none (2.5+). The sin-cos table is a non-persistent buffer (not in checkpoints), grown on
demand when a crop grid exceeds it.

`ResamplerAttention` is `nn.MultiheadAttention` math (same parameters) on SDPA, with the output projection *called
as a module*: ZeRO-3 only gathers a submodule's weights when that submodule runs, and stock MultiheadAttention
reads `out_proj.weight` directly.

Packed input (`forward(x, tgt_sizes, packed=True)`, x `[T, kv_dim]` from the packed vision tower): kv_proj / ln_kv
and the k/v projections run once over the T real patches, the query projection once; only the attention is per
crop, one unmasked SDPA call per run of equal-length crops (`vision.CropRuns`), as in the vision tower.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .transfer import host_to_device
from .vision import CropRuns


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """`[height, width, dim]` float32: `[i, j] = concat(sincos_1d(j), sincos_1d(i))` (MAE; first half = column).

    Computed as the remote code does, in float32 numpy throughout (positions, frequencies, products, sin/cos): the
    same recipe in float64 gives a table that differs in about half its entries (up to 9e-6 at D=3584).
    """
    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / np.float32(10000) ** (np.arange(d // 2, dtype=np.float32) / np.float32(d / 2.0))
        out = pos[..., None] * omega  # float32 [h, w, d/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    cols, rows = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
    emb = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=-1)
    return torch.from_numpy(emb.astype(np.float32, copy=False))


class ResamplerAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        # initialised here, as nn.MultiheadAttention does (xavier-uniform weight, zero bias), not only in
        # _init_weights: a model built under DeepSpeed's zero.Init is partitioned as each module's __init__ ends, and
        # transformers' init then writes into empty stubs, which left torch.empty's memory in the weights (the ZeRO-3
        # test's occasional non-finite step and eval logits). Drawn on the CPU from a private generator (the global
        # RNG stream, and so every random-weight build of a seed, stays as it was; a CPU generator can't fill a
        # tensor made under `with torch.device("cuda")`) and copied in (a no-op on meta; checkpoint values come next)
        bound = self.in_proj_bound(dim)
        draw = torch.rand(3 * dim, dim, generator=torch.Generator().manual_seed(0), device="cpu")
        with torch.no_grad():
            self.in_proj_weight.copy_(draw.mul_(2 * bound).sub_(bound))
        self.out_proj = nn.Linear(dim, dim)

    @staticmethod
    def in_proj_bound(dim: int) -> float:
        """The xavier-uniform bound of the `[3 * dim, dim]` in_proj matrix."""
        return (6.0 / (dim + 3 * dim)) ** 0.5

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None, runs: CropRuns | None = None) -> torch.Tensor:
        """query `[B, Q, D]`, key/value `[B, N, D]`, key_padding_mask `[B, N]` True = padding → `[B, Q, D]`.

        With `runs` (packed): query `[Q, D]` (shared by every crop), key/value `[T, D]` → `[n_crops, Q, D]`."""
        if runs is not None:
            return self._forward_packed(query, key, value, runs)
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, n_q, dim = query.shape
        heads = lambda x: x.reshape(b, x.shape[1], self.num_heads, dim // self.num_heads).transpose(1, 2)  # noqa: E731
        q, k, v = heads(F.linear(query, wq, bq)), heads(F.linear(key, wk, bk)), heads(F.linear(value, wv, bv))
        mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n_q, dim))

    def _forward_packed(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        runs: CropRuns) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        (n_q, dim), heads = query.shape, self.num_heads
        q = F.linear(query, wq, bq).view(n_q, heads, dim // heads).transpose(0, 1)  # [H, Q, hd]
        k = F.linear(key, wk, bk).view(-1, heads, dim // heads)
        v = F.linear(value, wv, bv).view(-1, heads, dim // heads)
        outs = []
        for start, count, length in runs.runs:
            rows = slice(start, start + count * length)
            kg, vg = (x[rows].view(count, length, heads, -1).transpose(1, 2) for x in (k, v))
            outs.append(F.scaled_dot_product_attention(q.expand(count, -1, -1, -1), kg, vg))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)  # [n, H, Q, hd]
        return self.out_proj(out.transpose(1, 2).reshape(out.shape[0], n_q, dim))


class Resampler(nn.Module):
    def __init__(self, num_queries: int, embed_dim: int, kv_dim: int, max_size: tuple[int, int] = (70, 70)):
        super().__init__()
        self.embed_dim = embed_dim
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim != embed_dim else nn.Identity()
        self.attn = ResamplerAttention(embed_dim, max(1, embed_dim // 128))
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter(embed_dim ** -0.5 * torch.randn(embed_dim, embed_dim))
        self.max_size = tuple(max_size)
        self.register_buffer("pos_embed", sincos_2d(embed_dim, *self.max_size), persistent=False)

    def reset_pos_embed(self, height: int, width: int) -> None:
        device = self.pos_embed.device if self.pos_embed.device.type != "meta" else torch.device("cpu")
        self.max_size = (height, width)
        self.pos_embed = sincos_2d(self.embed_dim, height, width).to(device)

    def _pos_table(self, sizes: list, device: torch.device) -> torch.Tensor:
        max_h, max_w = max(h for h, _ in sizes), max(w for _, w in sizes)
        if max_h > self.max_size[0] or max_w > self.max_size[1]:
            self.reset_pos_embed(max(max_h, self.max_size[0]), max(max_w, self.max_size[1]))
        return host_to_device(self.pos_embed, device)  # the buffer is there already unless its table grew

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """x `[B, Nmax, kv_dim]` (padded patches), tgt_sizes `[B, 2]` → `[B, Q, D]`.

        `packed=True`: x `[T, kv_dim]`, the crops' patches back to back (no padding) → `[n_crops, Q, D]`."""
        if packed:
            return self._forward_packed(x, tgt_sizes)
        b, n_max = x.shape[:2]
        sizes = tgt_sizes.tolist()
        pos_table = self._pos_table(sizes, x.device)
        rows = [F.pad(pos_table[:h, :w].reshape(h * w, -1), (0, 0, 0, n_max - h * w)) for h, w in sizes]
        pos = torch.stack(rows).to(x.dtype)
        # the key padding mask [B, Nmax] (True = padding) from the host sizes, queued to the device; None unpadded
        padding = torch.arange(n_max)[None, :] >= torch.tensor([h * w for h, w in sizes])[:, None]
        padding = host_to_device(padding, x.device) if bool(padding.any()) else None

        x = self.ln_kv(self.kv_proj(x))
        q = self.ln_q(self.query).unsqueeze(0).expand(b, -1, -1)
        out = self.attn(q, x + pos, x, padding)
        return self.ln_post(out) @ self.proj

    def _forward_packed(self, x: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        sizes = tgt_sizes.tolist()
        pos_table = self._pos_table(sizes, x.device)
        pos = torch.cat([pos_table[:h, :w].reshape(h * w, -1) for h, w in sizes]).to(x.dtype)
        x = self.ln_kv(self.kv_proj(x))
        out = self.attn(self.ln_q(self.query), x + pos, x, None, runs=CropRuns.from_sizes(tgt_sizes))
        return self.ln_post(out) @ self.proj
