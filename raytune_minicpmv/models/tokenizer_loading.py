"""Load a checkpoint's tokenizer with a plain transformers fast class: never remote code, never a prompt.

    from raytune_minicpmv.models.tokenizer_loading import load_tokenizer
    tok = load_tokenizer("/ckpt/MiniCPM-V-2_6")      # the published folder, tokenizer_config.json untouched

The published MiniCPM-V 2.5 / 2.6 folders name a remote-code class in `tokenizer_config.json`
(`tokenizer_class: MiniCPMVTokenizerFast` + an `auto_map` to `tokenization_minicpmv_fast.py`). That class is a thin
subclass of the stock fast tokenizer that only adds marker-id attributes (facts §9.7; we look the ids up ourselves in
`templates.TokenizerInfo`), so the plain class gives the same ids. `AutoTokenizer` would instead ask
"Do you wish to run the custom code?" and wait 15 s on an open stdin in every Ray Data actor, then fail.

Rule: a tokenizer_config.json with an `auto_map`, or a `tokenizer_class` transformers does not know, loads with
`PreTrainedTokenizerFast` from `tokenizer.json` (2.5 and 2.6 ship one), else with `Qwen2TokenizerFast` from
`vocab.json` + `merges.txt`; anything else goes through `AutoTokenizer` with `trust_remote_code=False`.
"""
from __future__ import annotations

import json
from pathlib import Path


class TokenizerLoadError(ValueError):
    """The tokenizer directory cannot be loaded without running its own Python code."""


def load_tokenizer(path):
    """A fast tokenizer for `path` (a checkpoint or tokenizer directory)."""
    import transformers

    path = Path(path)
    config = _tokenizer_config(path)
    remote_class = config.get("tokenizer_class")
    if config.get("auto_map") or (remote_class and not hasattr(transformers, remote_class)):
        if (path / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return transformers.Qwen2TokenizerFast.from_pretrained(str(path))
        raise TokenizerLoadError(
            f"{path}/tokenizer_config.json names the remote-code tokenizer class {remote_class!r} and the directory "
            "has neither tokenizer.json nor vocab.json + merges.txt to load it with a plain fast tokenizer; copy "
            "the checkpoint's tokenizer files there (or set data.tokenizer_path to a directory that has them)")
    return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def _tokenizer_config(path: Path) -> dict:
    cfg = path / "tokenizer_config.json"
    if not cfg.is_file():
        return {}
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerLoadError(f"{cfg}: not valid JSON ({e})") from e
