"""The native MiniCPM-V model: `vpm` (vision) → `resampler` → features placed into the `llm`'s input embeddings.

    model = MiniCPMV26.from_pretrained(ckpt_dir, dtype=torch.bfloat16)   # or models.load_model(ckpt_dir)
    out = model(batch)            # batch = pipeline.collate's dict (labels are ignored)
    out.logits                    # [B, L, vocab] in the model dtype (not upcast; compute_loss upcasts in chunks)

The forward, per batch:
1. every crop of every sample is zero-padded to the longest and run through `vpm` in chunks of
   `config.vision_batch_size` crops, then through the resampler → `[n_crops, Q, D]`; with `model.vision_varlen`
   (set by `models.kernels.configure_kernels`, a run's `model.vision_varlen`) the crops are sorted by length and
   packed side by side WITHOUT padding instead (vision.py "Packed"), all of the batch in one call unless
   `model.vision_chunk_crops` says otherwise: same features, no padded patch computed, unmasked SDPA per run of
   equal-length crops;
2. the LLM's token embeddings are computed and the crop features are written at the `image_bound` spans
   OUT OF PLACE (`index_copy`), so frozen embeddings + `enable_input_require_grads` + LoRA work (an in-place scatter
   on that output is the remote code's "leaf variable used in an in-place operation" error);
3. a batch with no crops still runs a zero-contribution dummy crop through `vpm` + resampler when training, so every
   rank touches the vision weights (ZeRO-3 gathers and DDP reductions would otherwise hang);
   Under ZeRO-3 every vision call is a collective (weights are gathered), so all ranks must make the SAME number
   of calls: with partitioned parameters all crops of the batch go through ONE call (`vision_batch_size` chunking
   would give ranks with more crops more calls, and the gathers fall out of step);
4. the LLM runs on `inputs_embeds` with `position_ids`. `attention_mask` is not passed, as in the remote code:
   padding is on the right and attention is causal, so real tokens never see it, and SDPA keeps its causal kernel.
   A packed row (several samples, positions restarting per sample) gets a block-diagonal causal mask from
   transformers' own packed-sequence detection, or the varlen kwargs of `packing.packed_llm_kwargs`.
5. `model(batch, loss_only=True)` (training with `model.fused_ce`): no logits; the LLM's decoder gives the final
   hidden states and the loss comes from them and `lm_head` (loss.linear_cross_entropy, or Liger's fused kernel
   when `fused_ce_impl == "liger"`) → `LossOutput(loss_sum, n_tokens)`. Evaluation and merge verification that
   need logits call the model as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, PreTrainedModel, Qwen2ForCausalLM
from transformers import initialization as init
from transformers.utils import ModelOutput

from .packing import packed_llm_kwargs
from .configuration import MiniCPMV25Config, MiniCPMV26Config, MiniCPMVConfig
from .loss import linear_cross_entropy
from .resampler import Resampler, ResamplerAttention, sincos_2d
from .transfer import host_to_device
from .vision import NavitSiglipVisionTower

DUMMY_TGT = (4, 4)  # patch grid of the zero-contribution crop of text-only training batches


def llm_position_ids(position_ids: Optional[torch.Tensor], device: torch.device) -> Optional[torch.Tensor]:
    """The LLM's `position_ids`: None for host rows that are each 0..L-1 (unpacked batches: the LLM's own default,
    the same positions), so transformers skips its packed-sequence check, a device-to-host read every forward;
    otherwise (packed rows restarting per sample, or any tensor already on a device) the ids on `device`."""
    if position_ids is None:
        return None
    if position_ids.device.type == "cpu" and position_ids.dim() == 2:
        steps = torch.arange(position_ids.shape[1], dtype=position_ids.dtype)
        if bool((position_ids == steps).all()):
            return None
    return host_to_device(position_ids, device).long()


@dataclass
class LossOutput(ModelOutput):
    """`model(batch, loss_only=True)`: float32 CE sum over labels != -100 and their count (a long tensor)."""

    loss_sum: Optional[torch.Tensor] = None
    n_tokens: Optional[torch.Tensor] = None


class MiniCPMVBase(PreTrainedModel):
    config_class = MiniCPMVConfig
    config: MiniCPMVConfig
    base_model_prefix = "minicpmv"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _no_split_modules = ["NavitEncoderLayer", "Qwen2DecoderLayer", "LlamaDecoderLayer", "Resampler"]
    llm_class: type = Qwen2ForCausalLM
    legacy_strip_positions = False
    vision_varlen = False  # packed crops (no padding) in image_features; the padded path is the reference
    vision_chunk: Optional[int] = None  # model.vision_chunk_crops (None: see image_features)
    fused_ce = False  # the training loop asks for loss_only=True (kernels.uses_fused_loss)
    fused_ce_impl = "torch"  # loss_only=True: "torch" (chunked, loss.py) or "liger" (set by kernels.py)
    # batch keys the forward reads on the host (shapes, spans, the check for packed positions): the train loop
    # leaves them there (worker.to_device), so the forward never waits on the GPU to read them back
    host_batch_keys = ("image_bound", "tgt_sizes", "position_ids")

    def __init__(self, config: MiniCPMVConfig):
        super().__init__(config)
        self.llm = self.llm_class(config.llm_config())
        vcfg = config.vision_config_hf()
        self.vpm = NavitSiglipVisionTower(vcfg, legacy_strip_positions=self.legacy_strip_positions)
        self.resampler = Resampler(config.query_num, config.hidden_size, vcfg.hidden_size,
                                   max_size=(vcfg.image_size // vcfg.patch_size,) * 2)
        self.post_init()

    # ---- weights init (random-weight builds, and missing keys / non-persistent buffers after from_pretrained)
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Resampler):
            init.trunc_normal_(module.query, std=0.02)
            init.normal_(module.proj, std=module.embed_dim ** -0.5)
            init.copy_(module.pos_embed, sincos_2d(module.embed_dim, *module.max_size))
        elif isinstance(module, ResamplerAttention):
            # xavier-uniform bound of the [3D, D] matrix, written shape-free (ZeRO-3 partitions are 1-D)
            bound = module.in_proj_bound(module.out_proj.in_features)
            init.uniform_(module.in_proj_weight, -bound, bound)
            init.zeros_(module.in_proj_bias)

    # ---- embeddings (PEFT, merge and enable_input_require_grads go through these)
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # ---- vision
    @property
    def zero3_partitioned(self) -> bool:
        """Parameters partitioned by DeepSpeed ZeRO-3 (each module call then all-gathers its weights)."""
        return hasattr(self.resampler.query, "ds_id")

    def image_features(self, crops: list[torch.Tensor], tgt_sizes: torch.Tensor) -> torch.Tensor:
        """crops: `[3, 14, N_i*14]` each; tgt_sizes `[n, 2]` → `[n, Q, D]` in the LLM's dtype."""
        dtype = self.vpm.embeddings.patch_embedding.weight.dtype
        tgt_sizes = tgt_sizes.to(torch.int32)
        chunk = self._vision_chunk(len(crops))
        if self.vision_varlen:
            return self._packed_image_features(crops, tgt_sizes, chunk, dtype)
        width = max(c.shape[-1] for c in crops)
        pixels = torch.stack([F.pad(c, (0, width - c.shape[-1])) for c in crops]).to(dtype)
        feats = []
        for s in range(0, len(crops), chunk):
            hidden = self.vpm(pixels[s:s + chunk], tgt_sizes[s:s + chunk])
            feats.append(self.resampler(hidden, tgt_sizes[s:s + chunk]))
        return torch.cat(feats).to(self.get_input_embeddings().weight.dtype)

    def _vision_chunk(self, n_crops: int) -> int:
        """Crops per vision-tower call. ZeRO-3 (ds_id on partitioned params): all, so every rank makes one call and
        gathers in step. Else model.vision_chunk_crops when set; else all for packed crops (chunking them only
        multiplied the tower's kernel launches: 4 chunks of the recipe's 54 crops at vision_batch_size 16) and the
        checkpoint's vision_batch_size for padded ones (it bounds the padded batch and its mask)."""
        if self.zero3_partitioned:
            return max(n_crops, 1)
        if self.vision_chunk:
            return int(self.vision_chunk)
        return max(n_crops, 1) if self.vision_varlen else max(1, int(self.config.vision_batch_size))

    def _packed_image_features(self, crops: list[torch.Tensor], tgt_sizes: torch.Tensor, chunk: int,
                               dtype: torch.dtype) -> torch.Tensor:
        """image_features without padding: longest crops first (so equal lengths are adjacent: few SDPA runs),
        each chunk's crops concatenated along the patch axis; the output is put back in the crops' order."""
        lengths = [c.shape[-1] for c in crops]
        order = sorted(range(len(crops)), key=lambda i: -lengths[i])
        # the sizes on the host once: the packed tower and resampler read them as Python ints (a device tensor
        # would sync the host there, after the tower's kernels are queued)
        host_sizes = tgt_sizes.cpu()
        feats = []
        for s in range(0, len(order), chunk):
            idx = order[s:s + chunk]
            pixels = torch.cat([crops[i] for i in idx], dim=-1)[None].to(dtype)
            sizes = host_sizes[torch.tensor(idx)]
            feats.append(self.resampler(self.vpm(pixels, sizes, packed=True), sizes, packed=True))
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        out = torch.cat(feats)
        return out.index_select(0, host_to_device(inverse, out.device)).to(self.get_input_embeddings().weight.dtype)

    def _dummy_features(self, device: torch.device) -> torch.Tensor:
        h, w = DUMMY_TGT
        p = self.config.patch_size
        crop = torch.zeros(3, p, h * w * p, device=device)
        return self.image_features([crop], torch.tensor([[h, w]]))

    # ---- forward
    def embed_inputs(self, input_ids: torch.Tensor, pixel_values=None, tgt_sizes=None,
                     image_bound=None) -> torch.Tensor:
        """LLM input embeddings `[B, L, D]` with each crop's Q features at its `image_bound` span."""
        emb = self.get_input_embeddings()(input_ids)
        batch, length, dim = emb.shape
        crops, sizes, positions = [], [], []
        for i in range(batch):
            sample_crops = list(pixel_values[i]) if pixel_values is not None else []
            # spans and sizes are read on the host (the train loop keeps them there: host_batch_keys)
            bounds = torch.as_tensor(image_bound[i] if image_bound is not None else [], dtype=torch.long)
            spans = bounds.reshape(-1, 2).tolist()
            if len(sample_crops) != len(spans):
                raise ValueError(f"sample {i}: {len(sample_crops)} image crops but {len(spans)} image_bound spans; "
                                 "the data stage must emit one span per crop")
            if len(sample_crops) == 0:
                continue
            if any(e - s != self.config.query_num or e > length for s, e in spans):
                raise ValueError(f"sample {i}: image_bound spans {spans} must each hold query_num="
                                 f"{self.config.query_num} positions inside the sequence (length {length})")
            crops += sample_crops
            sizes.append(torch.as_tensor(tgt_sizes[i]).reshape(-1, 2).cpu())
            positions.append(i * length + torch.cat([torch.arange(s, e) for s, e in spans]))
        if crops:
            feats = self.image_features(crops, torch.cat(sizes))
            index = host_to_device(torch.cat(positions), emb.device)
            emb = emb.reshape(batch * length, dim).index_copy(0, index, feats.reshape(-1, dim)).reshape(emb.shape)
        elif self.training or self.zero3_partitioned:
            # ZeRO-3 gathers weights collectively, so eval needs the dummy crop too
            emb = emb + self._dummy_features(emb.device).sum() * 0.0
        return emb

    def forward(self, batch: dict | None = None, *, loss_only: bool = False, **kwargs):
        """`model(batch)` (the collate dict; `model(**batch)` works too). Returns the LLM output (`.logits`);
        `loss_only=True`: a `LossOutput` from `batch["labels"]`, no logits (module docstring, point 5)."""
        batch = {**(batch or {}), **kwargs}
        emb = self.embed_inputs(batch["input_ids"], batch.get("pixel_values"), batch.get("tgt_sizes"),
                                batch.get("image_bound"))
        packed = packed_llm_kwargs(batch)  # packed rows (data.packing): varlen backends also get cu_seq_lens
        position_ids = llm_position_ids(batch.get("position_ids"), emb.device)
        if not loss_only:
            return self.llm(inputs_embeds=emb, position_ids=position_ids, use_cache=False, **packed)
        decoder = getattr(self.llm, self.llm.base_model_prefix)
        hidden = decoder(inputs_embeds=emb, position_ids=position_ids, use_cache=False, **packed).last_hidden_state
        return LossOutput(*self.hidden_loss(hidden, batch["labels"], batch.get("label_positions")))

    def hidden_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                    label_positions: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(CE sum, token count) of `lm_head(hidden)` against pre-shifted labels, without the full logits.
        `label_positions`: loss.with_label_positions' flat indices of the labelled tokens (saves a host sync)."""
        head = self.llm.get_output_embeddings()
        if self.fused_ce_impl == "liger" and type(head) is nn.Linear and not self.zero3_partitioned:
            from .kernels import liger_linear_cross_entropy

            return liger_linear_cross_entropy(hidden, labels, head, label_positions)
        vocab = getattr(head, "out_features", None) or self.config.vocab_size
        return linear_cross_entropy(hidden, labels, head, vocab, single_call=self.zero3_partitioned,
                                    label_positions=label_positions)


class MiniCPMV26(MiniCPMVBase):
    config_class = MiniCPMV26Config
    config: MiniCPMV26Config
    llm_class = Qwen2ForCausalLM


class MiniCPMV25(MiniCPMVBase):
    config_class = MiniCPMV25Config
    config: MiniCPMV25Config
    llm_class = LlamaForCausalLM
    legacy_strip_positions = True
