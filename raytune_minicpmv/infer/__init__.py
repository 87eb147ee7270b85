"""Inference stage: generation (2.6 / 2.5 native models, 4.6 / 4.7 transformers' classes), `chat`, Ray Data batch
`predict`, eval generation metrics.

    from raytune_minicpmv.infer import load_for_inference, GenerationSettings, generate, ChatSession, run_predict
    model, tok, spec = load_for_inference("ckpt_dir", adapter="runs/x/checkpoint_step_0000100")

Prompts come from the training preprocessing (prompts.py), so train and infer inputs agree. See docs/INFERENCE.md.
Sits above `data` and `models`, below `train` (whose workers compute `eval.generation_metrics` with it).
"""
from .chat import ChatSession, run_chat
from .generation import (GenerationSettings, apply_adapter, decode, generate, load_for_inference, stop_token_ids,
                         unwrap)
from .metrics import exact_match, resolve_metrics, token_f1
from .predict import run_predict
from .prompts import Prompt, chat_record, prompt_batch, prompt_of, prompt_rows, table_rows
from .prompts4 import Prompt4

__all__ = ["ChatSession", "run_chat", "GenerationSettings", "apply_adapter", "decode", "generate",
           "load_for_inference", "stop_token_ids", "unwrap", "exact_match", "token_f1", "resolve_metrics",
           "run_predict", "Prompt", "Prompt4", "chat_record", "prompt_batch", "prompt_of", "prompt_rows", "table_rows"]
