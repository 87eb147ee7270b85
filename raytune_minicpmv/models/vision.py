"""The vision tower (`vpm`): SigLIP-so400m as a NaViT over patch-packed crops of any size.

Input is the MiniCPM-V 2.5/2.6 packing: each crop `[3, 14, N*14]` (its N = h*w patches side by side in raster
order), zero-padded to the longest crop and stacked to `[B, 3, 14, Nmax*14]`, plus `tgt_sizes [B, 2] = (h, w)`.
Position ids map every patch's fractional (row, col) onto the 70x70 learned table (NaViT bucketing). They are
computed with the remote code's own tensor ops on the CPU (see `navit_position_ids`), so they are identical to it on
any device; the arithmetic is not a plain formula, and each shortcut tried differs at some grid sizes.

Padded patches are masked out of the attention with transformers' mask builder for the configured implementation
(an additive float mask for eager, bool for SDPA, a 2-D padding mask for flash-attention), so a crop gives the same
features alone as padded in a batch.

The encoder layers are transformers' `Idefics2EncoderLayer` (same math and state-dict names as the remote-code
SigLIP: `self_attn.{q,k,v,out}_proj`, `layer_norm{1,2}`, `mlp.fc{1,2}`), so they run transformers' attention
implementations (eager, SDPA, flash-attention; the remote code runs eager) and support gradient checkpointing
through transformers' `GradientCheckpointingLayer`.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import Idefics2VisionConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer


@functools.lru_cache(maxsize=None)
def _bucket_coords(n: int, side: int) -> torch.Tensor:
    """Bucket index (0..side-1) of each of `n` patches along one axis, exactly as the remote code computes it.

    The remote code divides 1 by the int32 `tgt_sizes` element (a float32 step, not the Python float 1/n) and runs
    `torch.arange` on the CPU (no device argument), whose float32 output comes from CPU-specific accumulation
    (8-wide blocks from a rounded base). A Python-float step differs at n = 25, 49, 50, 55, 58; a CUDA arange
    (float32 `i * step`) at n = 49, 58. So: the same ops, same dtypes, on the CPU, whatever the model's device.
    """
    step = 1 / torch.tensor(n, dtype=torch.int32)  # float32, as the remote code's `1 / tgt_sizes[i][0]`
    coords = torch.arange(0, 1 - 1e-6, step.item(), dtype=torch.float32, device="cpu")
    boundaries = torch.arange(1 / side, 1.0, 1 / side, dtype=torch.float32, device="cpu")
    return torch.bucketize(coords, boundaries, right=True)


def navit_position_ids(tgt_sizes: torch.Tensor, num_patches_per_side: int, max_patches: int) -> torch.Tensor:
    """`[B, max_patches]` position ids (on `tgt_sizes.device`) into the `side x side` table; padding slots get 0.

    Patch (r, c) of an h x w crop gets `bucket_h[r] * side + bucket_w[c]` (raster order), where the buckets are
    the remote code's: `bucketize(arange(0, 1 - 1e-6, 1/n), arange(1/side, 1.0, 1/side), right=True)`, in float32
    on the CPU (`_bucket_coords`).
    """
    out = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
    for i, (h, w) in enumerate(tgt_sizes.tolist()):
        rows, cols = _bucket_coords(h, num_patches_per_side), _bucket_coords(w, num_patches_per_side)
        out[i, : h * w] = (rows[:, None] * num_patches_per_side + cols).flatten()
    return out.to(tgt_sizes.device)


class NavitEmbeddings(nn.Module):
    def __init__(self, config: Idefics2VisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.image_size // config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, padding="valid")
        self.position_embedding = nn.Embedding(self.num_patches_per_side ** 2, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B, C, 1, Nmax]
        x = x.flatten(2).transpose(1, 2)
        return x + self.position_embedding(position_ids)


class NavitEncoder(nn.Module):
    def __init__(self, config: Idefics2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([Idefics2EncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            hidden = layer(hidden, attention_mask)
        return hidden


class NavitSiglipVisionTower(nn.Module):
    """`vpm`: embeddings → encoder → post_layernorm. `forward(pixels, tgt_sizes) -> [B, Nmax, C]`.

    `legacy_strip_positions=True` reproduces MiniCPM-Llama3-V 2.5, whose Idefics2 tower saw a `[B, 1, Nmax]`
    all-True patch mask: positions bucketed as one 1 x Nmax strip and padded patches not masked out.
    """

    def __init__(self, config: Idefics2VisionConfig, legacy_strip_positions: bool = False):
        super().__init__()
        self.config = config
        self.legacy_strip_positions = legacy_strip_positions
        self.embeddings = NavitEmbeddings(config)
        self.encoder = NavitEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        batch, n_max = pixel_values.shape[0], pixel_values.shape[-1] // self.config.patch_size
        side = self.embeddings.num_patches_per_side
        if self.legacy_strip_positions:
            strip = torch.tensor([[1, n_max]] * batch, device=tgt_sizes.device)
            position_ids = navit_position_ids(strip, side, n_max)
            valid = None
        else:
            position_ids = navit_position_ids(tgt_sizes, side, n_max)
            n_valid = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(pixel_values.device)
            valid = torch.arange(n_max, device=pixel_values.device)[None, :] < n_valid[:, None]  # [B, Nmax]
        hidden = self.embeddings(pixel_values, position_ids.to(pixel_values.device))
        # The mask in the form the attention implementation needs (eager adds it to the scores, so a bool mask
        # there would add 0/1 instead of masking); None when nothing is padded, so SDPA picks its fastest kernel.
        mask = None if valid is None else create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                                                    attention_mask=valid)
        hidden = self.encoder(hidden, mask)
        return self.post_layernorm(hidden)
