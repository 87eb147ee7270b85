"""Resume safety without Ray running: checkpoint completeness markers, repair of Ray Train's run snapshot (checked
by loading it with Ray's own CheckpointManager), config changes on resume, metrics after a resume, and the input
fingerprint of preprocessed data."""
import json
import os
from pathlib import Path

import pytest
import yaml

from raytune_minicpmv.train.checkpoint import CorruptCheckpointError, write_marker, verify_checkpoint
from raytune_minicpmv.config import ConfigError, load_config
from raytune_minicpmv.train.resume_check import SNAPSHOT, check_config_change, prepare_resume, repair_snapshot, rewind_history

DEMO = Path(__file__).resolve().parents[3] / "configs" / "demo.yaml"


def cfg_for(tmp_path, *overrides):
    return load_config(DEMO, [f"run.storage_path={tmp_path}", "run.name=r", "train.max_steps=8", *overrides],
                       check_paths=False)


def fake_checkpoint(run_dir: Path, step: int, cfg, world: int = 2) -> Path:
    """A checkpoint directory as the workers leave it: per-rank shards, rank-0 files, one marker per rank."""
    d = run_dir / f"checkpoint_step_{step:07d}"
    for rank in range(world):
        (d / "deepspeed" / "state").mkdir(parents=True, exist_ok=True)
        (d / "deepspeed" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"x" * 1000)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 500)
    (d / "train_state.json").write_text(json.dumps({"step": step, "epoch": 0, "batch_in_epoch": step,
                                                    "tokens_seen": 10.0 * step, "best_eval_loss": None}))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    for rank in range(world):  # each rank's marker lists the files of its own directory; here they share one
        write_marker(str(d), rank, world)
    return d


def write_snapshot(run_dir: Path, steps: list[int]) -> None:
    import ray

    results = [{"version": 0, "checkpoint_dir_name": f"checkpoint_step_{s:07d}", "metrics": {"step": s}}
               for s in steps]
    snap = {"ray_version": ray.__version__, "checkpoint_results": results,
            "checkpoint_report_indices": list(range(1, len(steps) + 1)), "latest_checkpoint_result": results[-1],
            "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(steps) + 1,
            "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": []}
    (run_dir / SNAPSHOT).write_text(json.dumps(snap))


def ray_latest(tmp_path, name="r"):
    """What Ray Train itself would hand the workers as `get_checkpoint()` from this run dir."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    m = CheckpointManager(CheckpointConfig(num_to_keep=2), StorageContext(str(tmp_path), name))
    r = m.latest_checkpoint_result
    return None if r is None else os.path.basename(r.checkpoint.path)


@pytest.fixture
def run(tmp_path):
    cfg = cfg_for(tmp_path)
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    fake_checkpoint(run_dir, 2, cfg)
    fake_checkpoint(run_dir, 4, cfg)
    write_snapshot(run_dir, [2, 4])
    return cfg, run_dir


def test_marker_names_a_truncated_or_missing_file(run):
    _, run_dir = run
    d = run_dir / "checkpoint_step_0000004"
    assert verify_checkpoint(str(d)) == []
    shard = d / "deepspeed" / "state" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 10)
    (d / "adapter" / "adapter_model.safetensors").unlink()
    problems = verify_checkpoint(str(d))
    assert any(str(shard) in p and "10 bytes, 1000 written" in p for p in problems), problems
    assert any("adapter_model.safetensors: missing" in p for p in problems), problems
    (d / "complete" / "rank_1.json").unlink()
    assert any("rank_1.json" in p for p in verify_checkpoint(str(d)))


def test_load_checkpoint_refuses_a_damaged_one_naming_the_file(run):
    from raytune_minicpmv.train.checkpoint import load_checkpoint

    _, run_dir = run
    d = run_dir / "checkpoint_step_0000004"
    (d / "train_state.json").write_text("{")
    with pytest.raises(CorruptCheckpointError, match=r"train_state.json: 1 bytes"):
        load_checkpoint(engine=None, ckpt_dir=str(d))  # refused before the engine is touched


def test_truncated_latest_checkpoint_falls_back_to_the_newest_complete_one(run, caplog):
    cfg, run_dir = run
    assert ray_latest(run_dir.parent) == "checkpoint_step_0000004"
    shard = run_dir / "checkpoint_step_0000004" / "deepspeed" / "state" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"x" * 3)

    plan = prepare_resume(cfg)
    assert plan.checkpoint == str(run_dir / "checkpoint_step_0000002") and plan.step == 2
    assert any(str(shard) in p for p in plan.dropped)  # the bad file is named
    assert str(shard) in caplog.text
    assert ray_latest(run_dir.parent) == "checkpoint_step_0000002"  # Ray itself now resumes from the fallback
    assert list(run_dir.glob("checkpoint_step_0000004.bad-*"))  # kept for inspection, out of Ray's way
    assert list(run_dir.glob(f"{SNAPSHOT}.bak-*"))


def test_deleted_checkpoint_dir_no_longer_blocks_resume(run):
    import shutil

    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    cfg, run_dir = run
    shutil.rmtree(run_dir / "checkpoint_step_0000004")
    with pytest.raises(CheckpointManagerInitializationError):  # what Ray does with such a run dir on its own
        ray_latest(run_dir.parent)
    latest, dropped = repair_snapshot(str(run_dir))
    assert latest == "checkpoint_step_0000002" and "does not exist" in dropped[0]
    assert ray_latest(run_dir.parent) == "checkpoint_step_0000002"


def test_no_complete_checkpoint_left_restarts_from_step_0(run):
    cfg, run_dir = run
    for step in (2, 4):
        (run_dir / f"checkpoint_step_{step:07d}" / "complete" / "rank_0.json").unlink()
    plan = prepare_resume(cfg)
    assert plan.checkpoint is None and plan.step == 0 and len(plan.dropped) == 2
    assert ray_latest(run_dir.parent) is None


def test_unregistered_complete_checkpoint_is_adopted_and_a_partial_one_moved_aside(run):
    cfg, run_dir = run
    fake_checkpoint(run_dir, 6, cfg)  # saved, then the driver was stopped before Ray registered it
    partial = fake_checkpoint(run_dir, 8, cfg)
    (partial / "complete" / "rank_1.json").unlink()  # killed mid-save
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n"
                                                   for s in range(1, 8)))
    plan = prepare_resume(cfg)
    assert plan.step == 6 and plan.checkpoint.endswith("checkpoint_step_0000006")
    assert ray_latest(run_dir.parent) == "checkpoint_step_0000006"
    assert not partial.exists() and list(run_dir.glob("checkpoint_step_0000008.bad-*"))


def test_unreadable_snapshot_is_rebuilt_from_the_checkpoints(run):
    cfg, run_dir = run
    (run_dir / SNAPSHOT).write_text('{"ray_version": "2.6')  # cut short
    assert prepare_resume(cfg).step == 4
    assert ray_latest(run_dir.parent) == "checkpoint_step_0000004"


def test_incompatible_config_changes_are_refused_with_their_keys(run, tmp_path):
    _, run_dir = run
    ckpt = str(run_dir / "checkpoint_step_0000004")
    with pytest.raises(ConfigError) as e:
        check_config_change(cfg_for(tmp_path, "optim.lr=5e-2", "lora.r=16", "trainable.vision=lora"), ckpt)
    assert [p.split(":")[0] for p in e.value.problems] == ["lora.r", "optim.lr", "trainable.vision"]
    assert "0.001 to 0.05" in str(e.value)
    with pytest.raises(ConfigError, match="model.path"):
        check_config_change(cfg_for(tmp_path, "model.path=/elsewhere"), ckpt)
    with pytest.raises(ConfigError, match="data.train_path"):
        check_config_change(cfg_for(tmp_path, "data.train_path=/other.json"), ckpt)


def test_compatible_config_changes_are_applied_and_listed(run, tmp_path):
    _, run_dir = run
    applied = check_config_change(cfg_for(tmp_path, "train.max_steps=12", "train.save_steps=4"),
                                  str(run_dir / "checkpoint_step_0000004"))
    assert applied == {"train.max_steps": (8, 12), "train.save_steps": (10, 4)}


def test_a_finished_run_is_reported_as_finished(run, tmp_path):
    plan = prepare_resume(cfg_for(tmp_path, "train.max_steps=4"))
    assert plan.finished and plan.step == 4


def test_rewind_history_drops_steps_after_the_resume_point(tmp_path):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 7)))
    tb = tmp_path / "tb"
    tb.mkdir()
    rewind_history(str(jsonl), str(tb), 4)
    assert [json.loads(ln)["step"] for ln in jsonl.read_text().splitlines()] == [1, 2, 3, 4]
    events = [e for f in tb.iterdir() for e in EventFileLoader(str(f)).Load()]
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == 1]  # START
    assert starts == [5]  # TensorBoard drops older events from step 5 on


def test_fingerprint_detects_a_changed_data_file_and_ignores_a_touch(tmp_path):
    from raytune_minicpmv.data.fingerprint import inputs_fingerprint, stale_reasons
    from raytune_minicpmv.data.templates import model_spec_from_config

    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": i} for i in range(16)]))
    tok = Path(__file__).resolve().parents[2] / "assets" / "minicpmv26_tokenizer"
    model = Path(__file__).resolve().parents[2] / "assets" / "configs" / "minicpmv26_config"
    spec = model_spec_from_config(str(model), "qwen2", 2)
    cfg = cfg_for(tmp_path, f"data.train_path={data}", "data.eval_path=null")
    before = inputs_fingerprint(cfg.data, spec, str(tok))
    os.utime(data, (1, 1))
    assert stale_reasons(before, inputs_fingerprint(cfg.data, spec, str(tok))) == []
    data.write_text(json.dumps([{"id": i} for i in range(4)]))
    reasons = stale_reasons(before, inputs_fingerprint(cfg.data, spec, str(tok)))
    assert len(reasons) == 1 and reasons[0].startswith("data.train: content changed")
    other = cfg_for(tmp_path, f"data.train_path={data}", "data.eval_path=null", "data.model_max_length=512")
    assert any("model_max_length" in r for r in stale_reasons(before, inputs_fingerprint(other.data, spec, str(tok))))
    assert stale_reasons(None, before)[0].startswith("the preprocessed data has no input fingerprint")


def test_tune_redoes_stale_preprocessed_data_or_refuses_under_a_running_search(tmp_path):
    from raytune_minicpmv.data.fingerprint import inputs_fingerprint
    from raytune_minicpmv.data.pipeline import model_side
    from raytune_minicpmv.tune.search import _check_preprocessed, experiment_name

    assets = Path(__file__).resolve().parents[2] / "assets"
    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"id": i} for i in range(16)]))
    cfg = cfg_for(tmp_path, f"data.train_path={data}", f"data.eval_path={data}",
                  f"model.path={assets / 'configs' / 'minicpmv26_config'}",
                  f"data.tokenizer_path={assets / 'minicpmv26_tokenizer'}")
    assert _check_preprocessed(cfg) is False  # nothing preprocessed yet
    out = Path(cfg.data_output_path)
    out.mkdir(parents=True)
    (out / "report.json").write_text(json.dumps({"fingerprint": inputs_fingerprint(cfg.data, *model_side(cfg))}))
    assert _check_preprocessed(cfg) is True  # same inputs: reused

    data.write_text(json.dumps([{"id": i} for i in range(4)]))  # the 16-record file became a 4-record one
    assert _check_preprocessed(cfg) is False  # no search trained on it yet: redone
    (tmp_path / experiment_name(cfg.run)).mkdir()
    with pytest.raises(ConfigError, match=r"data: the inputs changed .*data.train: content changed"):
        _check_preprocessed(cfg)


def test_a_new_run_has_nothing_to_resume(tmp_path):
    plan = prepare_resume(cfg_for(tmp_path))  # the run dir does not exist yet (first start of a tune trial)
    assert plan.checkpoint is None and plan.step == 0 and not plan.finished


def test_packing_is_batch_geometry_but_its_attention_backend_may_change(run, tmp_path):
    """data.packing / train.max_tokens_per_batch change which rows a data position points at: refused. The packed
    rows' attention backend is a kernel choice (same results): applied."""
    _, run_dir = run
    ckpt = str(run_dir / "checkpoint_step_0000004")
    with pytest.raises(ConfigError) as e:
        check_config_change(cfg_for(tmp_path, "data.packing=true", "train.max_tokens_per_batch=4096",
                                    "train.micro_batch_size=1"), ckpt)
    assert {"data.packing", "train.max_tokens_per_batch"} <= {p.split(":")[0] for p in e.value.problems}
    assert check_config_change(cfg_for(tmp_path, "model.packed_attention=sdpa"), ckpt) == {
        "model.packed_attention": ("auto", "sdpa")}
