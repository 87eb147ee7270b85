"""The sample dataset is deterministic and covers every record shape the pipeline supports."""
import hashlib
import json

from PIL import Image

from raytune_minicpmv.data.sample_data import write_sample_dataset


def _tree_digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic(tmp_path):
    write_sample_dataset(tmp_path / "a")
    write_sample_dataset(tmp_path / "b")
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


def test_covers_record_shapes(tmp_path):
    path = write_sample_dataset(tmp_path)
    recs = json.loads(path.read_text())
    assert len(recs) == 20 and len({r["id"] for r in recs}) == 20
    single = [r for r in recs if isinstance(r.get("image"), str)]
    multi = [r for r in recs if isinstance(r.get("image"), dict)]
    assert [r for r in recs if "image" not in r], "text-only records"
    assert any("<image>" in r["conversations"][0]["content"] for r in single)
    assert any("<image>" not in r["conversations"][0]["content"] for r in single)
    assert any(len(r["conversations"]) > 2 for r in recs), "multi-turn"
    assert any("system" in r for r in recs)
    assert any("<image_01>" in r["conversations"][2]["content"] for r in multi if len(r["conversations"]) > 2)
    sizes = [Image.open(tmp_path / p).size for r in single + multi
             for p in ([r["image"]] if isinstance(r["image"], str) else r["image"].values())]
    assert sum(w * h > 448 * 448 for w, h in sizes) >= 2, "a few images large enough to slice"
    assert sum(w * h <= 448 * 448 for w, h in sizes) > len(sizes) // 2
    eval_path = write_sample_dataset(tmp_path, split="eval")
    assert eval_path.name == "eval.json" and len(json.loads(eval_path.read_text())) == 6
