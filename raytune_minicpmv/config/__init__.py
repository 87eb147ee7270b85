"""Typed configuration: one frozen dataclass per concern, YAML as their serialization.

    cfg = load_config("configs/demo.yaml", ["train.max_steps=10", "optim.lr=3e-4"])

`load_config` reads the YAML, applies dotted ``key.path=value`` overrides (values parsed as YAML scalars),
builds the dataclasses and validates them. Every problem (unknown key, wrong type, out-of-range value, missing
path, inconsistent combination) is collected and raised at once as a `ConfigError` naming the key path and the
fix. Relative paths in a config file resolve against the file's directory, so a config works from any CWD;
relative paths given as overrides (on the command line) resolve against the current directory, as a shell would.

`schema.py` (the dataclasses, every field with its default and a comment), `loading.py` (YAML, overrides, paths,
coercion), `validation.py` (every rule between and within sections).
"""
from .loading import PATH_KEYS, config_from_dict, load_config, replace
from .schema import (Config, ConfigError, DataConfig, DeepSpeedConfig, EvalConfig, GenerateConfig, LoraConfig,
                     MergeConfig, ModelConfig, OptimConfig, RayConfig, RunConfig, ScalingConfig, SearchSpaceConfig,
                     TrainableConfig, TrainConfig, TuneConfig, is_uri, join_uri)
from .validation import LLM_TYPES, resolve_llm_type, validate

__all__ = ["Config", "ConfigError", "RunConfig", "RayConfig", "DataConfig", "ModelConfig", "TrainableConfig",
           "LoraConfig", "OptimConfig", "TrainConfig", "EvalConfig", "GenerateConfig", "DeepSpeedConfig",
           "ScalingConfig", "SearchSpaceConfig",
           "TuneConfig", "MergeConfig", "load_config", "config_from_dict", "replace", "validate", "resolve_llm_type",
           "join_uri", "is_uri", "PATH_KEYS", "LLM_TYPES"]
