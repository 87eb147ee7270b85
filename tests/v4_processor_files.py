"""Test-only: minimal tokenizer + image-processor files for tiny 4.6 / 4.7 checkpoints, and their processor.

    write_processor_files(dir)                  # tiny byte-level BPE + the processor's special tokens
    processor = load_processor(ckpt, "minicpmv4_6")
    batch = processor(text=[...], images=[...])  # transformers' own MiniCPMV4_6Processor.__call__

The data stage owns the real writer (branch i13data); until it lands, the model-side tests build their files here.
The processor is transformers' `MiniCPMV4_6Processor` / `MiniCPMV4_7Processor`; the only shim: this venv has no
torchvision, which transformers' video processor needs, so the processor gets a stand-in video processor that
carries the two attributes its __init__ reads (image-only calls never touch it).
"""
from __future__ import annotations

import types
from pathlib import Path

SPECIAL = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "image_start_token": "<image>",
           "image_end_token": "</image>", "slice_start_token": "<slice>", "slice_end_token": "</slice>",
           "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>"}


def write_processor_files(out) -> Path:
    from transformers import AutoTokenizer, MiniCPMV4_6ImageProcessorPil

    from raytune_minicpmv.models.tiny_tokenizer import build_tiny_tokenizer

    out = Path(out)
    build_tiny_tokenizer(out, "qwen2")
    tok = AutoTokenizer.from_pretrained(str(out), extra_special_tokens=SPECIAL)
    tok.add_tokens(["<|image_pad|>", "<|video_pad|>"], special_tokens=True)
    tok.save_pretrained(str(out))
    # scale_resolution 112 (real: 448): 64 patches per crop instead of 1024, so CPU tests stay fast
    MiniCPMV4_6ImageProcessorPil(scale_resolution=112, max_slice_nums=4).save_pretrained(str(out))
    return out


def load_processor(ckpt, family: str, downsample_mode: str = "16x"):
    from transformers import AutoTokenizer, MiniCPMV4_6ImageProcessorPil, MiniCPMV4_6Processor, MiniCPMV4_7Processor

    base = MiniCPMV4_7Processor if family == "minicpmv4_7" else MiniCPMV4_6Processor

    class _Processor(base):  # the real __call__; only the video-processor class check is skipped (no torchvision)
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor":
                return type(argument)
            return super().check_argument_for_proper_class(argument_name, argument)

    image = MiniCPMV4_6ImageProcessorPil.from_pretrained(str(ckpt), downsample_mode=downsample_mode)
    video = types.SimpleNamespace(slice_mode=True, downsample_mode=downsample_mode)
    return _Processor(image_processor=image, video_processor=video, tokenizer=AutoTokenizer.from_pretrained(str(ckpt)))


def labelled_batch(processor, texts: list[str], images: list, answer_tokens: int = 6) -> dict:
    """The processor's batch plus `labels`: the last `answer_tokens` real tokens of each row (pre-shifted targets,
    -100 elsewhere), the way the data stage labels assistant turns."""
    import torch

    batch = dict(processor(text=texts, images=images or None))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    labels = torch.full_like(ids, -100)
    for r in range(ids.shape[0]):
        real = mask[r].nonzero().flatten()
        last = real[-answer_tokens - 1:]
        labels[r, last[:-1]] = ids[r, last[1:]]  # position t predicts token t+1
    batch["labels"] = labels
    return batch
