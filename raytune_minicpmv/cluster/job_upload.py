"""What `raytune-minicpmv submit` uploads as the job's working_dir, and the refusal when it is too big.

    plan = plan_upload(Path("."), DEFAULT_EXCLUDES)     # the files Ray would put into the package
    check_upload_size(plan)                             # JobError naming the biggest files when over the limit

Ray packs `runtime_env.working_dir` into a zip minus `runtime_env.excludes` (gitignore-style patterns matched
against the path relative to the working dir) and minus what every `.gitignore` / `.rayignore` in the tree lists
(Ray reads them in each directory it walks; RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns the .gitignore part off). The
listing here walks the tree with Ray's own walker and pattern matcher (`ray._private.runtime_env.packaging`, pinned
Ray), so the count and size printed before the upload are those of the package Ray builds.

Limits: the Jobs API (the dashboard's HTTP server) refuses request bodies over 100 MiB with a bare
`413 Request Entity Too Large`; we refuse before uploading, with the reason and the biggest files.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Never uploaded. The job reads data, models and checkpoints from shared storage; secrets stay on this machine.
SECRET_EXCLUDES = [".env", ".env.*", "*.env", ".envrc", ".aws/", ".ssh/", ".gnupg/", ".kube/", ".docker/",
                   ".netrc", ".pypirc", ".git-credentials", ".npmrc", "*.pem", "*.key", "*.p12", "*.pfx", "*.keytab",
                   "id_rsa*", "id_dsa*", "id_ecdsa*", "id_ed25519*", "credentials", "credentials.json",
                   ".ray/auth_token", "auth_token"]
DATA_EXCLUDES = ["*.parquet", "*.arrow", "*.feather", "*.tfrecord", "*.npy", "*.npz", "*.h5", "*.hdf5", "*.csv",
                 "*.tsv", "*.jsonl", "*.png", "*.jpg", "*.jpeg", "*.gif", "*.bmp", "*.tif", "*.tiff", "*.webp",
                 "*.mp4", "*.avi", "*.mov", "*.zip", "*.tar", "*.tar.gz", "*.tgz", "*.7z"]
WEIGHT_EXCLUDES = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.pkl", "*.pickle",
                   "*.msgpack"]
TOOLING_EXCLUDES = [".git", ".hg", ".svn", ".venv", "venv", "env/", "node_modules", "__pycache__", "*.pyc",
                    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", "*.egg-info", "build/",
                    "dist/", ".whl/", "runs/", "demo_out/", "wandb/", "mlruns/", "lightning_logs/"]
DEFAULT_EXCLUDES = SECRET_EXCLUDES + DATA_EXCLUDES + WEIGHT_EXCLUDES + TOOLING_EXCLUDES

MAX_UPLOAD_BYTES = 100 * 1024**2  # ray_constants.DASHBOARD_CLIENT_MAX_SIZE: the Jobs API's request body limit


class UploadError(RuntimeError):
    """The working dir cannot be uploaded as it is (printed without a traceback)."""


@dataclass(frozen=True)
class UploadPlan:
    root: Path
    files: tuple[tuple[str, int], ...]  # (path relative to root, bytes), sorted by path

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def summary(self) -> str:
        return f"uploading {len(self.files)} files, {_mib(self.total_bytes)} from {self.root} as the job's working_dir"


def include_gitignore() -> bool:
    """Ray's own switch (dashboard_sdk): .gitignore files are honoured unless RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1."""
    return os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"


def plan_upload(root: Path, excludes: list[str]) -> UploadPlan:
    """The files Ray's packager would put into the working_dir zip (same walker, same matchers)."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = root.resolve()
    found: list[tuple[str, int]] = []

    def handler(path: Path) -> None:
        if path.is_file():
            found.append((str(path.relative_to(root)), path.stat().st_size))

    _dir_travel(root, [_get_excludes(root, excludes)], handler, include_gitignore=include_gitignore())
    return UploadPlan(root, tuple(sorted(found)))


def check_upload_size(plan: UploadPlan, excludes: list[str], limit: int = MAX_UPLOAD_BYTES) -> int:
    """Refuse a package the Jobs API would reject; returns the package size (zip bytes, or raw bytes when small).

    The raw size bounds the zip size from above, so only a tree larger than the limit is zipped (with Ray's packager)
    to measure what would really be sent.
    """
    size = plan.total_bytes
    if size > limit:
        from ray._private.runtime_env.packaging import create_package

        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / "pkg.zip"
            create_package(str(plan.root), target, include_gitignore=include_gitignore(), excludes=excludes)
            size = target.stat().st_size
    if size > limit:
        biggest = sorted(plan.files, key=lambda f: -f[1])[:5]
        raise UploadError(
            f"the working dir {plan.root} packs to {_mib(size)} ({len(plan.files)} files), over the "
            f"{_mib(limit)} the Ray Jobs API accepts (it would answer '413 Request Entity Too Large'). Biggest "
            "files: " + ", ".join(f"{p} ({_mib(s)})" for p, s in biggest) + ". Put data and checkpoints on shared "
            "storage, list what the job does not need in .gitignore or .rayignore, or pass --exclude PATTERN, or a "
            "smaller --working-dir.")
    return size


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"
