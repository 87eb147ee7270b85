"""Model configs of the native MiniCPM-V families, read from a checkpoint's flat `config.json`.

    cfg = MiniCPMV26Config.from_checkpoint_dict(json.load(open("ckpt/config.json")))
    cfg.llm_config()      # -> transformers Qwen2Config (LLM fields of the same flat dict)
    cfg.vision_config_hf()  # -> transformers Idefics2VisionConfig (SigLIP so400m dims, NaViT)

A real MiniCPM-V `config.json` is flat: the LLM's fields (hidden_size, num_hidden_layers, rope_theta, ...) sit at the
top level next to the multimodal ones (`query_num`, `slice_config`, `vision_config`, `use_image_id`,
`vision_batch_size`, `drop_vision_last_layer`, `batch_vision_input`, `version`). We keep that layout, so a config we
save reads like the original. Our `model_type` is `raytune_minicpmv2_6` / `raytune_minicpmv2_5`, never the
remote-code `minicpmv`, so registering with AutoConfig cannot shadow or be shadowed by `trust_remote_code` loading.

Every key of the published config.json is accepted by all three entry points — `from_checkpoint_dict`,
`from_pretrained(dir)` (PEFT calls it on the base dir when saving an adapter) and `__init__` — with the same result
(tests/unit/test_config_round_trip.py audits every key of the real 2.6 and 2.5 files). Keys that are not stored
as given: top-level `patch_size` (kept in `vision_config`; `patch_size` reads it back), the remote-code `auto_map`
and `architectures: ["MiniCPMV"]` (they name code our class is not; a config we save must not point at it),
`slice_config.model_type`, and `model_type` itself (ours).
"""
from __future__ import annotations

import copy
import logging

from transformers import Idefics2VisionConfig, LlamaConfig, PreTrainedConfig, Qwen2Config

log = logging.getLogger(__name__)

# The SigLIP-so400m NaViT tower shared by 2.5 and 2.6 (2.6 `MiniCPMVConfig` class default, facts §9.2).
DEFAULT_VISION_CONFIG = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip",
                         "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
DEFAULT_SLICE_CONFIG = {"patch_size": 14, "max_slice_nums": 9, "scale_resolution": 448}

REMOTE_MODEL_TYPE = "minicpmv"  # the published checkpoints' model_type (their remote-code config class)
REMOTE_ARCHITECTURES = ["MiniCPMV"]

# Keys of the flat dict that are not LLM fields (dropped before building the LLM config).
_MULTIMODAL_KEYS = {"query_num", "image_size", "drop_vision_last_layer", "batch_vision_input", "slice_config",
                    "vision_config", "use_image_id", "vision_batch_size", "slice_mode", "version",
                    "mm_use_im_start_end", "patch_size", "auto_map", "architectures", "model_type",
                    "_name_or_path", "transformers_version", "init_vision", "init_audio", "init_tts"}


class MiniCPMVConfig(PreTrainedConfig):
    """Multimodal fields + the flat LLM fields. Subclasses fix `model_type` and the LLM config class."""

    model_type = "raytune_minicpmv"
    llm_config_class = Qwen2Config
    default_query_num = 64

    def __init__(self, query_num: int | None = None, image_size: int = 448, drop_vision_last_layer: bool = True,
                 batch_vision_input: bool = True, slice_config: dict | None = None, vision_config: dict | None = None,
                 use_image_id: bool = True, vision_batch_size: int = 16, slice_mode: bool = True,
                 version: str | None = None, patch_size: int | None = None, **kwargs):
        # Remote-code pointers describe the official classes, not ours: never carry them into a config we save.
        kwargs.pop("auto_map", None)
        if kwargs.get("architectures") == REMOTE_ARCHITECTURES:
            kwargs.pop("architectures")
        self.query_num = query_num if query_num is not None else self.default_query_num
        self.image_size = image_size
        # The remote-code class default is True, but the real 2.5/2.6 config.json files say false: the loader warns
        # when a checkpoint leaves it out (see `from_checkpoint_dict`).
        self.drop_vision_last_layer = drop_vision_last_layer
        self.batch_vision_input = batch_vision_input
        sc = dict(slice_config or {"max_slice_nums": 1})  # remote-code default when absent: no slicing
        sc.pop("model_type", None)
        self.slice_config = {**DEFAULT_SLICE_CONFIG, **sc}
        self.vision_config = {**DEFAULT_VISION_CONFIG, **(vision_config or {})}
        if patch_size is not None:  # 2.5/2.6 repeat it at the top level (2.0 has it only there): one source of truth
            given = (vision_config or {}).get("patch_size")
            if given is not None and int(given) != int(patch_size):
                raise ValueError(f"config.json: patch_size {patch_size} differs from vision_config.patch_size {given}")
            self.vision_config["patch_size"] = int(patch_size)
        self.use_image_id = use_image_id
        self.vision_batch_size = vision_batch_size
        self.slice_mode = slice_mode
        self.version = version
        super().__init__(**kwargs)

    @classmethod
    def from_checkpoint_dict(cls, raw: dict) -> "MiniCPMVConfig":
        """Build from a checkpoint's config.json dict (ours, or the remote-code `minicpmv` one)."""
        raw = copy.deepcopy(raw)
        if "drop_vision_last_layer" not in raw:
            log.warning("config.json has no drop_vision_last_layer; using the remote-code class default (true), "
                        "which runs one vision layer fewer than the checkpoint may hold")
        for k in ("model_type", "transformers_version", "_name_or_path"):
            raw.pop(k, None)
        return cls(**raw)

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """`from_pretrained` on a published checkpoint: its `model_type: minicpmv` is the remote-code name of the
        config this class reads (relabelled, so transformers does not warn about a model-type mismatch)."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") == REMOTE_MODEL_TYPE:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    # ---- derived configs
    @property
    def patch_size(self) -> int:
        return int(self.vision_config.get("patch_size", 14))

    @property
    def vision_layers(self) -> int:
        n = int(self.vision_config["num_hidden_layers"])
        return n - 1 if self.drop_vision_last_layer else n

    def llm_config(self) -> PreTrainedConfig:
        flat = {k: v for k, v in self.to_dict().items() if k not in _MULTIMODAL_KEYS}
        cfg = self.llm_config_class.from_dict(flat)
        cfg._attn_implementation = self._attn_implementation or "sdpa"
        return cfg

    def vision_config_hf(self) -> Idefics2VisionConfig:
        v = self.vision_config
        cfg = Idefics2VisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                                   num_hidden_layers=self.vision_layers,
                                   num_attention_heads=v["num_attention_heads"], patch_size=self.patch_size,
                                   image_size=v.get("image_size", 980), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
                                   hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"))
        # SDPA in the vision tower (the remote code runs eager; they agree to ~1e-6 relative in fp32).
        cfg._attn_implementation = self._attn_implementation or "sdpa"
        return cfg


class MiniCPMV26Config(MiniCPMVConfig):
    """MiniCPM-V 2.6: Qwen2-7B LLM, SigLIP NaViT with tgt_sizes, 64 queries, `<image_id>` tags."""

    model_type = "raytune_minicpmv2_6"
    llm_config_class = Qwen2Config
    default_query_num = 64

    def __init__(self, **kwargs):  # explicit: PreTrainedConfig would generate a dataclass __init__ otherwise
        super().__init__(**kwargs)


class MiniCPMV25Config(MiniCPMVConfig):
    """MiniCPM-Llama3-V 2.5: Llama3-8B LLM, Idefics2 SigLIP, 96 queries, no `<image_id>`."""

    model_type = "raytune_minicpmv2_5"
    llm_config_class = LlamaConfig
    default_query_num = 96

    def __init__(self, use_image_id: bool = False, **kwargs):
        super().__init__(use_image_id=use_image_id, **kwargs)
