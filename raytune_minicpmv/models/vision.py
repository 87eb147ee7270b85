"""The vision tower (`vpm`): SigLIP-so400m as a NaViT over patch-packed crops of any size.

Input is the MiniCPM-V 2.5/2.6 packing: each crop `[3, 14, N*14]` (its N = h*w patches side by side in raster
order), zero-padded to the longest crop and stacked to `[B, 3, 14, Nmax*14]`, plus `tgt_sizes [B, 2] = (h, w)`.
Position ids map every patch's fractional (row, col) onto the 70x70 learned table (NaViT bucketing), computed in
float32 exactly as the remote code does (an integer shortcut differs at some grid sizes, e.g. 25 or 49 per side).

The encoder layers are transformers' `Idefics2EncoderLayer` (same math and state-dict names as the remote-code
SigLIP: `self_attn.{q,k,v,out}_proj`, `layer_norm{1,2}`, `mlp.fc{1,2}`), so they run SDPA and support
gradient checkpointing through transformers' `GradientCheckpointingLayer`.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer


def navit_position_ids(tgt_sizes: torch.Tensor, num_patches_per_side: int, max_patches: int) -> torch.Tensor:
    """`[B, max_patches]` position ids into the `side x side` table; padding slots get 0.

    Mirrors the remote code: `arange(0, 1 - 1e-6, 1/n)` in float32, bucketized against
    `arange(1/side, 1.0, 1/side)` with `right=True`.
    """
    device = tgt_sizes.device
    boundaries = torch.arange(1 / num_patches_per_side, 1.0, 1 / num_patches_per_side, device=device)
    out = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long, device=device)
    for i, (h, w) in enumerate(tgt_sizes.tolist()):
        fh = torch.arange(0, 1 - 1e-6, 1 / h, device=device)
        fw = torch.arange(0, 1 - 1e-6, 1 / w, device=device)
        bh = torch.bucketize(fh, boundaries, right=True)
        bw = torch.bucketize(fw, boundaries, right=True)
        out[i, : h * w] = (bh[:, None] * num_patches_per_side + bw).flatten()
    return out


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
            mask = None
        else:
            position_ids = navit_position_ids(tgt_sizes, side, n_max)
            n_valid = (tgt_sizes[:, 0] * tgt_sizes[:, 1]).to(pixel_values.device)
            valid = torch.arange(n_max, device=pixel_values.device)[None, :] < n_valid[:, None]  # [B, Nmax]
            # Bool SDPA mask (True = attend); None when nothing is padded so SDPA can pick its fastest kernel.
            mask = None if bool(valid.all()) else valid[:, None, None, :]
        hidden = self.embeddings(pixel_values, position_ids.to(pixel_values.device))
        hidden = self.encoder(hidden, mask)
        return self.post_layernorm(hidden)
