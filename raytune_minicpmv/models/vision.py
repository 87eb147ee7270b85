"""The vision tower (`vpm`): SigLIP-so400m as a NaViT over patch-packed crops of any size.

Input is the MiniCPM-V 2.5/2.6 packing: each crop `[3, 14, N*14]` (its N = h*w patches side by side in raster
order), zero-padded to the longest crop and stacked to `[B, 3, 14, Nmax*14]`, plus `tgt_sizes [B, 2] = (h, w)`.
Position ids map every patch's fractional (row, col) onto the 70x70 learned table (NaViT bucketing). They are
computed with the remote code's own tensor ops on the CPU (see `navit_position_ids`), so they are identical to it on
any device; the arithmetic is not a plain formula, and each shortcut tried differs at some grid sizes.

Padded patches are masked out of the attention with transformers' mask builder for the configured implementation
(an additive float mask for eager, bool for SDPA, a 2-D padding mask for flash-attention), so a crop gives the same
features alone as padded in a batch.

Packed ("varlen") input, `forward(pixels, tgt_sizes, packed=True)`: the crops side by side with NO padding,
`[1, 3, 14, T*14]` for T = sum of h*w, output `[T, C]`. Every per-patch op (patch conv, position embedding, layer
norms, q/k/v/out projections, MLP) runs once over the T real patches; only the attention is per crop: `CropRuns`
groups consecutive crops of the same patch count, and each group is one unmasked SDPA call over `[count, L]`
(SDPA's fastest kernels need no mask, and no padded patch is computed anywhere). The caller sorts crops by
length so that the groups are few (modeling.image_features). The attention has no weights, so the number of
SDPA calls may differ between ranks under ZeRO-3; each weighted module still runs once per call.

The encoder layers are `NavitEncoderLayer`: transformers' `Idefics2EncoderLayer` (same math and state-dict names as
the remote-code SigLIP: `self_attn.{q,k,v,out}_proj`, `layer_norm{1,2}`, `mlp.fc{1,2}`), so the padded path runs
transformers' attention implementations (eager, SDPA, flash-attention; the remote code runs eager), plus the packed
forward; both are called as modules, with gradient checkpointing through transformers' `GradientCheckpointingLayer`
and ZeRO-3 leaf-module hooks (models/zero3.py) applying alike.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Idefics2VisionConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.idefics2.modeling_idefics2 import Idefics2EncoderLayer

from .transfer import host_to_device


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
    """`[B, max_patches]` position ids (on the host) into the `side x side` table; padding slots get 0.

    Patch (r, c) of an h x w crop gets `bucket_h[r] * side + bucket_w[c]` (raster order), where the buckets are
    the remote code's: `bucketize(arange(0, 1 - 1e-6, 1/n), arange(1/side, 1.0, 1/side), right=True)`, in float32
    on the CPU (`_bucket_coords`).
    """
    out = torch.zeros(len(tgt_sizes), max_patches, dtype=torch.long)
    for i, (h, w) in enumerate(tgt_sizes.tolist()):
        out[i, : h * w] = _crop_position_ids(h, w, num_patches_per_side)
    return out


def _crop_position_ids(h: int, w: int, side: int) -> torch.Tensor:
    rows, cols = _bucket_coords(h, side), _bucket_coords(w, side)
    return (rows[:, None] * side + cols).flatten()


def packed_position_ids(tgt_sizes: torch.Tensor, num_patches_per_side: int) -> torch.Tensor:
    """`[T]` position ids (on the host) of crops packed side by side (crop i's h*w ids, then crop i+1's)."""
    return torch.cat([_crop_position_ids(h, w, num_patches_per_side) for h, w in tgt_sizes.tolist()])


@dataclass(frozen=True)
class CropRuns:
    """Runs of consecutive crops with the same patch count in a packed sequence: `(start, count, length)` each."""

    runs: tuple[tuple[int, int, int], ...]

    @classmethod
    def from_sizes(cls, tgt_sizes: torch.Tensor) -> "CropRuns":
        runs: list[list[int]] = []
        start = 0
        for h, w in tgt_sizes.tolist():
            n = h * w
            if runs and runs[-1][2] == n:
                runs[-1][1] += 1
            else:
                runs.append([start, 1, n])
            start += n
        return cls(tuple(tuple(r) for r in runs))

    @property
    def total(self) -> int:
        return sum(count * length for _, count, length in self.runs)

    @property
    def longest(self) -> int:
        return max((length for _, _, length in self.runs), default=0)

    def cu_seqlens(self) -> list[int]:
        """Each crop's start in the packed sequence, then the total (varlen attention's `cu_seq_lens`)."""
        out = [0]
        for _, count, length in self.runs:
            out += [out[-1] + length * (i + 1) for i in range(count)]
        return out


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: CropRuns, scale: float,
                      dropout: float = 0.0) -> torch.Tensor:
    """Per-crop full attention over packed tokens: q/k/v `[T, H, D]` → `[T, H*D]`, one SDPA call per run.

    The runs are `split` off, not sliced: a slice's backward writes a zero tensor of the whole sequence per run and
    autograd sums them (runs x 3 full-size passes for each of q, k, v); a split's backward is one concatenation."""
    heads, dim = q.shape[1], q.shape[2]
    sizes = [count * length for _, count, length in runs.runs]
    outs = []
    for (_, count, length), *qkv in zip(runs.runs, *(x.split(sizes) for x in (q, k, v))):
        qg, kg, vg = (x.view(count, length, heads, dim).transpose(1, 2) for x in qkv)
        og = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=dropout, scale=scale)
        outs.append(og.transpose(1, 2).reshape(count * length, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def varlen_crop_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                          longest: int, scale: float) -> torch.Tensor:
    """Per-crop full attention over packed tokens in ONE kernel call: q/k/v `[T, H, D]` → `[T, H*D]`.

    torch's `varlen_attn` (CUDA, bf16/fp16; no dropout) with the crops' starts as `cu_seqlens`: the same math as
    `grouped_attention`, without a call (and, for cuDNN, a graph build) per run of equal-length crops.
    """
    from torch.nn.attention.varlen import varlen_attn

    out = varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest, scale=scale)
    return out.reshape(q.shape[0], -1)


@dataclass(frozen=True)
class PackedCrops:
    """Passed to a `NavitEncoderLayer` in place of its attention mask: the hidden states are packed `[T, C]` crops.
    `varlen` = (cu_seqlens on the device, longest crop): the attention as one varlen call (model.vision_attention)."""
    runs: CropRuns
    varlen: tuple[torch.Tensor, int] | None = None


class NavitEncoderLayer(Idefics2EncoderLayer):
    """`Idefics2EncoderLayer` (same submodules, state-dict names and padded math) that also runs packed crops:
    `layer(hidden [T, C], PackedCrops(runs))`.

    The packed tower calls each layer as a module, so everything attached to the layer applies: transformers'
    gradient checkpointing (GradientCheckpointingLayer), and DeepSpeed ZeRO-3's hooks when the layer is a leaf
    module (deepspeed.zero3_leaf_layers: its parameters gathered once per pass, its gradients reduced from its
    backward hook). The per-token submodules are still called as modules (LoRA / PEFT wrappers on them apply).
    """

    def forward(self, hidden_states: torch.Tensor, attention_mask, **kwargs) -> torch.Tensor:
        if isinstance(attention_mask, PackedCrops):
            return self._forward_packed(hidden_states, attention_mask)
        return super().forward(hidden_states, attention_mask, **kwargs)

    def _forward_packed(self, h: torch.Tensor, packed: PackedCrops) -> torch.Tensor:
        attn = self.self_attn
        x = self.layer_norm1(h)
        shape = (x.shape[0], attn.num_heads, attn.head_dim)
        q, k, v = (proj(x).view(shape) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        dropout = attn.dropout if attn.training else 0.0
        if packed.varlen is not None and dropout:
            raise ValueError("model.vision_attention=varlen: the vision tower's attention_dropout must be 0")
        out = grouped_attention(q, k, v, packed.runs, attn.scale, dropout) if packed.varlen is None else \
            varlen_crop_attention(q, k, v, packed.varlen[0], packed.varlen[1], attn.scale)
        h = h + attn.out_proj(out)
        return h + self.mlp(self.layer_norm2(h))


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
        # row-major [B, N, C]: left a transposed view, its channel-major layout propagated through every residual
        # add of the tower (each layer norm then copied its input and its gradient; ~2 strided copies a layer)
        x = x.flatten(2).transpose(1, 2).contiguous()
        return x + self.position_embedding(position_ids)


class NavitEncoder(nn.Module):
    def __init__(self, config: Idefics2VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([NavitEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | PackedCrops | None) -> torch.Tensor:
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

    def forward(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor, packed: bool = False) -> torch.Tensor:
        """Padded `[B, 3, 14, Nmax*14]` → `[B, Nmax, C]`; `packed=True`: `[1, 3, 14, T*14]` → `[T, C]`."""
        if packed:
            return self._forward_packed(pixel_values, tgt_sizes)
        batch, n_max = pixel_values.shape[0], pixel_values.shape[-1] // self.config.patch_size
        side = self.embeddings.num_patches_per_side
        if self.legacy_strip_positions:
            strip = torch.tensor([[1, n_max]] * batch, device=tgt_sizes.device)
            position_ids = navit_position_ids(strip, side, n_max)
            valid = None
        else:
            position_ids = navit_position_ids(tgt_sizes, side, n_max)
            n_valid = tgt_sizes[:, 0] * tgt_sizes[:, 1]
            # [B, Nmax], built where the sizes are (the host, in training) and queued to the device
            valid = host_to_device(torch.arange(n_max, device=n_valid.device)[None, :] < n_valid[:, None],
                                   pixel_values.device)
        hidden = self.embeddings(pixel_values, host_to_device(position_ids, pixel_values.device))
        # The mask in the form the attention implementation needs (eager adds it to the scores, so a bool mask
        # there would add 0/1 instead of masking); None when nothing is padded, so SDPA picks its fastest kernel.
        mask = None if valid is None else create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                                                    attention_mask=valid)
        hidden = self.encoder(hidden, mask)
        return self.post_layernorm(hidden)

    def _forward_packed(self, pixel_values: torch.Tensor, tgt_sizes: torch.Tensor) -> torch.Tensor:
        if self.legacy_strip_positions:
            raise ValueError("packed (varlen) vision input is not available for the MiniCPM-Llama3-V 2.5 tower: its "
                             "crops attend their padding (remote-code behaviour), so padding changes its output")
        runs = CropRuns.from_sizes(tgt_sizes)
        if pixel_values.dim() == 3:
            pixel_values = pixel_values[None]
        if pixel_values.shape[0] != 1 or pixel_values.shape[-1] != runs.total * self.config.patch_size:
            raise ValueError(f"packed pixels {tuple(pixel_values.shape)}: expected [1, 3, {self.config.patch_size}, "
                             f"{runs.total * self.config.patch_size}] for tgt_sizes {tgt_sizes.tolist()}")
        position_ids = packed_position_ids(tgt_sizes, self.embeddings.num_patches_per_side)
        hidden = self.embeddings(pixel_values, host_to_device(position_ids, pixel_values.device)[None])[0]  # [T, C]
        packed = PackedCrops(runs)
        if getattr(self, "crop_attention", "grouped") == "varlen":  # models.kernels (model.vision_attention)
            cu = host_to_device(torch.tensor(runs.cu_seqlens(), dtype=torch.int32), hidden.device)
            packed = PackedCrops(runs, (cu, runs.longest))
        return self.post_layernorm(self.encoder(hidden, packed))
