"""Text generation for a loaded model: the images are embedded once, then the LLM's own transformers `generate`
decodes on `inputs_embeds` with its KV cache (greedy or sampled; stops at eos / `<|im_end|>` / `<|eot_id|>`).

    model, tok, spec = load_for_inference("ckpt_dir", adapter="runs/x/checkpoint_step_0000100")  # 2.x or 4.x
    settings = GenerationSettings.from_config(cfg.generate)           # or GenerationSettings(max_new_tokens=64)
    new_ids = generate(model, prompt_batch(prompts), settings, stop_token_ids(tok.tokenizer))   # list[list[int]]
    text = decode(tok.tokenizer, new_ids[0])

Native 2.6 / 2.5: `model.embed_inputs` (the training forward's step 1-2: vision → resampler → features at the
`image_bound` spans) builds `[B, L, D]` once; `model.llm.generate(inputs_embeds=..., attention_mask=...)` returns
only the new tokens (as the official `chat()`, which also passes embeddings only: `repetition_penalty` therefore
counts generated tokens, not the prompt). 4.6 / 4.7 (transformers' `MiniCPMV4_6ForConditionalGeneration` /
`MiniCPMV4_7ForConditionalGeneration`, no `embed_inputs`): the class's own multimodal `generate` on the processor
batch of `prompts4.prompt_batch4` (input_ids, attention_mask, packed pixel_values, target_sizes, 4.7's
mm_token_type_ids — 4.7 lays out its canvas M-RoPE positions from the ids — and `downsample_mode`); the images are
encoded once in the prefill, the hybrid cache holds the KV and the linear-attention states; the prompt is cut off
the output (here `repetition_penalty` also counts the prompt's tokens, as transformers does with input ids).
`synced_gpus=True` keeps DeepSpeed ZeRO-3 ranks stepping together (each forward is a collective) until all finish.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

# End-of-turn tokens of the chat formats we train (ChatML, Llama 3) and the tokenizer's eos: generation stops at any
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 100
    repetition_penalty: float = 1.0
    seed: Optional[int] = None

    @classmethod
    def from_config(cls, gen_cfg, **changes) -> "GenerationSettings":
        """From the config's `generate` section; `changes` override single fields (None values are ignored)."""
        fields = {k: getattr(gen_cfg, k) for k in cls.__dataclass_fields__}
        fields.update({k: v for k, v in changes.items() if v is not None})
        return cls(**fields)

    def hf_config(self, stop_ids: list[int], pad_id: int):
        from transformers import GenerationConfig

        knobs = dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k) \
            if self.do_sample else dict(do_sample=False)
        return GenerationConfig(max_new_tokens=self.max_new_tokens, repetition_penalty=self.repetition_penalty,
                                eos_token_id=list(stop_ids), pad_token_id=pad_id, use_cache=True, **knobs)


def stop_token_ids(tokenizer, extra: tuple[int, ...] = ()) -> list[int]:
    """The tokenizer's eos plus every end-of-turn token it knows (STOP_TOKENS), plus `extra`."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for t in STOP_TOKENS:
        i = tokenizer.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i not in ids:
            ids.append(i)
    return ids + [i for i in extra if i not in ids]


def unwrap(model):
    """The model that owns `embed_inputs` / `generate`: under a DeepSpeed engine (`.module`) and PEFT's wrapper
    (LoRA layers live inside the base model's modules, so the unwrapped model still applies them)."""
    model = getattr(model, "module", model)  # DeepSpeedEngine
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


@torch.no_grad()
def generate(model, batch: dict, settings: GenerationSettings, stop_ids: list[int], pad_id: int = 0,
             streamer=None, synced_gpus: bool = False) -> list[list[int]]:
    """New token ids per sample of a left-padded `prompts.prompt_batch` (on the model's device), each cut before
    its first stop token."""
    model = unwrap(model)
    config = settings.hf_config(stop_ids, pad_id)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    if hasattr(model, "embed_inputs"):  # native MiniCPM-V 2.x: images embedded once, the LLM decodes
        emb = model.embed_inputs(batch["input_ids"], batch["pixel_values"], batch["tgt_sizes"], batch["image_bound"])
        out = model.llm.generate(inputs_embeds=emb, attention_mask=batch["attention_mask"], generation_config=config,
                                 streamer=streamer, synced_gpus=synced_gpus)
    else:  # 4.6 / 4.7: the family's own multimodal transformers generate (processor inputs in `batch`)
        out = model.generate(**batch, generation_config=config, streamer=streamer, synced_gpus=synced_gpus)
        out = out[:, batch["input_ids"].shape[1]:]
    return [cut_at_stop(seq.tolist(), stop_ids) for seq in out.cpu()]


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The ids before the first stop token (the padding generate adds after it goes too)."""
    stops = set(stop_ids)
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True).strip()


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_for_inference(model_dir, adapter: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                       device: Optional[str] = None, llm_type: Optional[str] = None,
                       max_slice_nums: Optional[int] = None, downsample_mode: Optional[str] = None):
    """(model in eval mode on `device`, tokenizer side, model side) of a checkpoint, with an adapter applied.

    2.6 / 2.5: (model, TokenizerInfo, ModelSpec). 4.6 / 4.7: (transformers' model, Processor4Info, Spec4): the
    family's processor with `max_slice_nums` / `downsample_mode` as given (None: the checkpoint's), as the data stage
    builds it, so prompts go through the same rows path as training (prompts.prompt_rows).
    `adapter`: a training checkpoint dir (its `adapter/`, or `full_model/` for a full fine-tune), a PEFT adapter dir
    (merged into the weights in memory: decoding then runs at base speed), or a dir of trained tensors.
    dtype None: bf16 on a GPU, fp32 on CPU."""
    from ..models import get_family, load_model

    family = get_family(str(model_dir))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    model = load_model(str(model_dir), dtype=dtype)
    if adapter is not None:
        model = apply_adapter(model, adapter)
    model = model.to(device).eval()
    if family.hf_native:
        from ..data.family4 import Spec4

        spec = Spec4(family.name, str(model_dir), downsample_mode, max_slice_nums)
        return model, spec.load(), spec
    from ..data.templates import TokenizerInfo, model_spec_from_config

    spec = model_spec_from_config(str(model_dir), llm_type or family.llm_type, max_slice_nums)
    return model, TokenizerInfo.load(str(model_dir)), spec


def resolve_adapter(path) -> Path:
    """A checkpoint dir -> its adapter/ (or full_model/); an adapter dir stays itself."""
    path = Path(path)
    for sub in ("adapter", "full_model"):
        if (path / sub).is_dir() and not (path / "adapter_config.json").is_file():
            return path / sub
    if not path.is_dir():
        raise FileNotFoundError(f"--adapter {path}: no such directory")
    return path


def apply_adapter(model, adapter) -> torch.nn.Module:
    """The base model with the trained weights of `adapter` in it (LoRA merged, fully trained modules copied)."""
    path = resolve_adapter(adapter)
    if (path / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"--adapter {path}: neither adapter_config.json nor *.safetensors trained tensors")
    state = {k: v for f in files for k, v in load_file(str(f)).items()}
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"--adapter {path}: tensors {unknown[:5]} are not in the base model (another family?)")
    model.load_state_dict(state, strict=False)
    return model
