"""A train or eval split too small to use is refused in the driver, before any worker starts (issue 9 defect 2)."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.train.trainer import check_split_rows, split_rows


def cfg(*overrides):
    return load_config(None, ["scaling.num_workers=2", "train.micro_batch_size=3", *overrides], check_paths=False)


def _parquet_split(root, split, reasons):
    (root / split).mkdir(parents=True)
    pq.write_table(pa.table({"id": [str(i) for i in range(len(reasons))], "skip_reason": reasons}),
                   root / split / "part-0.parquet")


def test_preprocessed_rows_are_the_kept_rows(tmp_path):
    _parquet_split(tmp_path, "train", ["", "", "too_long", ""])
    _parquet_split(tmp_path, "eval", ["too_long", "bad_image"])  # every record skipped: zero rows
    c = cfg("data.preprocessed=true", f"data.output_path={tmp_path}")
    assert split_rows(c, "train") == 3 and split_rows(c, "eval") == 0
    (tmp_path / "empty").mkdir()
    assert split_rows(cfg("data.preprocessed=true", f"data.output_path={tmp_path}"), "empty") == 0


def test_empty_eval_split_is_a_clear_error_naming_the_key_and_the_fix(tmp_path):
    train, evals = tmp_path / "train.json", tmp_path / "eval.json"
    train.write_text(json.dumps([{"id": str(i), "conversations": []} for i in range(6)]))
    evals.write_text("[]")
    c = cfg(f"data.train_path={train}", f"data.eval_path={evals}")
    assert split_rows(c, "train") == 6 and split_rows(c, "eval") == 0
    check_split_rows(c, {"train": 6})  # no eval split: fine
    with pytest.raises(ConfigError) as e:
        check_split_rows(c, {"train": 6, "eval": 0})
    assert "data.eval_path" in str(e.value) and str(evals) in str(e.value)
    assert "drop data.eval_path to train without evaluation" in str(e.value)
    with pytest.raises(ConfigError, match="each of the 2 workers needs at least one"):
        check_split_rows(c, {"train": 6, "eval": 1})


def test_train_split_needs_one_micro_batch_per_worker(tmp_path):
    c = cfg(f"data.train_path={tmp_path / 't.json'}")
    check_split_rows(c, {"train": 6})
    with pytest.raises(ConfigError, match=r"has 5 rows; 2 workers x train.micro_batch_size 3 need at least 6"):
        check_split_rows(c, {"train": 5})
    with pytest.raises(ConfigError, match="has 0 rows"):
        check_split_rows(c, {"train": 0})
