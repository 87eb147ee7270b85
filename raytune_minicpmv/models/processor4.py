"""transformers' own MiniCPM-V 4.6 / 4.7 processor for a checkpoint directory (no remote code, no download).

    proc = load_processor4("ckpt_dir", downsample_mode="4x")    # MiniCPMV4_6Processor / MiniCPMV4_7Processor
    out = proc(text=[rendered], images=[pil_rgb, ...])        # input_ids, pixel_values, target_sizes, ...

`AutoProcessor.from_pretrained` is used when it can load the folder. transformers resolves a processor's video
component only with torchvision installed (its class check looks `VideoProcessorMixin` up among the torchvision-only
exports, and `AutoVideoProcessor` hands out a placeholder without it), although the 4.6 video processor itself needs
only torch. Without torchvision we build the same processor class from its parts: the PIL image processor, the
video processor and the tokenizer, each `from_pretrained` on the folder, and the folder's chat template. Images then
go through the PIL backend (`MiniCPMV4_6ImageProcessorPil`), which is what transformers uses without torchvision.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

FAMILIES4 = ("minicpmv4_6", "minicpmv4_7")


def family4_of(path) -> Optional[str]:
    """'minicpmv4_6' / 'minicpmv4_7' from a checkpoint's config.json `model_type`, else None."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return None
    model_type = json.loads(cfg.read_text()).get("model_type")
    return model_type if model_type in FAMILIES4 else None


def processor_class(family: str):
    if family not in FAMILIES4:
        raise ValueError(f"family {family!r}: expected one of {', '.join(FAMILIES4)}")
    allow_video_processor_without_torchvision()
    if family == "minicpmv4_6":
        from transformers import MiniCPMV4_6Processor

        return MiniCPMV4_6Processor
    from transformers import MiniCPMV4_7Processor

    return MiniCPMV4_7Processor


def allow_video_processor_without_torchvision() -> None:
    """Let ProcessorMixin's class check find the video processor base class when transformers hid it (no
    torchvision): `VideoProcessorMixin` (5.18 on) or `BaseVideoProcessor` (5.17)."""
    import transformers.processing_utils as pu
    import transformers.video_processing_utils as vpu

    for name in ("VideoProcessorMixin", "BaseVideoProcessor"):
        real = getattr(vpu, name, None)
        if real is not None and getattr(pu.transformers_module, name, None) is not real:  # hidden: a dummy
            setattr(pu.transformers_module, name, real)


def load_processor4(path, family: Optional[str] = None, downsample_mode: Optional[str] = None,
                    max_slice_nums: Optional[int] = None, tokenizer_path=None):
    """The family's transformers processor for `path`; `downsample_mode` / `max_slice_nums` override its config."""
    family = family or family4_of(path)
    cls = processor_class(family)
    if tokenizer_path is None:
        try:
            proc = cls.from_pretrained(str(path))
        except ImportError as e:  # torchvision missing: same class, built from its parts
            log.debug("%s: %s; building %s from its parts", path, e, cls.__name__)
            proc = _from_parts(cls, path, path)
    else:
        proc = _from_parts(cls, path, tokenizer_path)
    if downsample_mode is not None:
        if downsample_mode not in ("16x", "4x"):
            raise ValueError(f"downsample_mode {downsample_mode!r}: expected '16x' or '4x'")
        proc.image_processor.downsample_mode = proc.video_processor.downsample_mode = downsample_mode
    if max_slice_nums is not None:
        proc.image_processor.max_slice_nums = int(max_slice_nums)
    return proc


def _from_parts(cls, path, tokenizer_path):
    from transformers import AutoTokenizer
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    tok = AutoTokenizer.from_pretrained(str(tokenizer_path))
    image = MiniCPMV4_6ImageProcessorPil.from_pretrained(str(path))
    video = MiniCPMV4_6VideoProcessor.from_pretrained(str(path))
    template = _chat_template(Path(path)) or tok.chat_template
    return cls(image_processor=image, video_processor=video, tokenizer=tok, chat_template=template)


def _chat_template(path: Path) -> Optional[str]:
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    js = path / "chat_template.json"
    return json.loads(js.read_text()).get("chat_template") if js.is_file() else None
