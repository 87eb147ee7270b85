"""A small bitsandbytes wheel for one CUDA: the PyPI wheel (~43 MB: CUDA 11.8 … 13.2, ROCm and XPU libraries) with
every native library removed except `libbitsandbytes_<cuda>.so` and the CPU one, its RECORD rewritten to match.

    pip download 'bitsandbytes>=0.48' --no-deps -d /tmp/bnb         # on a machine with network access
    python benchmarks/strip_bnb_wheel.py /tmp/bnb/bitsandbytes-*.whl --cuda cuda130 --out .whl/
    # on the GPU machine (torch 2.11+cu130 there): pip install --no-index --no-deps .whl/bitsandbytes-*.whl

bitsandbytes picks its library from torch's CUDA version at import (`libbitsandbytes_cuda130.so` for a cu130
torch; BNB_CUDA_VERSION=130 forces it), so a copy for one machine needs only that one. The result keeps the
wheel's name and metadata; pip checks every file against RECORD, which therefore lists exactly what is left.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import re
import zipfile
from pathlib import Path

NATIVE = re.compile(r"^bitsandbytes/libbitsandbytes_(\w+)\.(so|dll|dylib)$")


def strip_wheel(src: Path, out_dir: Path, keep: tuple[str, ...]) -> Path:
    """Write `out_dir/<same name>.whl` holding the Python files and the native libraries named in `keep`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise ValueError(f"{dst}: the output would overwrite the input wheel; choose another --out")
    with zipfile.ZipFile(src) as zin:
        names = zin.namelist()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        kept = [n for n in names if n != record and _wanted(n, keep)]
        missing = [k for k in keep if not any(NATIVE.match(n) and NATIVE.match(n).group(1) == k for n in kept)]
        if missing:
            libs = sorted(NATIVE.match(n).group(1) for n in names if NATIVE.match(n))
            raise ValueError(f"{src.name} has no libbitsandbytes_{missing[0]}: it ships {', '.join(libs)}")
        lines = []
        with zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
            for name in kept:
                data = zin.read(name)
                zout.writestr(zin.getinfo(name), data)
                digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                lines.append(f"{name},sha256={digest},{len(data)}")
            lines.append(f"{record},,")
            zout.writestr(record, "\n".join(lines) + "\n")
    return dst


def _wanted(name: str, keep: tuple[str, ...]) -> bool:
    m = NATIVE.match(name)
    return m is None or m.group(1) in keep


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("wheel", type=Path, help="the PyPI bitsandbytes wheel (pip download bitsandbytes --no-deps)")
    p.add_argument("--cuda", default="cuda130", help="the native library to keep besides cpu (default cuda130)")
    p.add_argument("--out", type=Path, default=Path(".whl"))
    a = p.parse_args(argv)
    dst = strip_wheel(a.wheel, a.out, ("cpu", a.cuda))
    print(f"{dst}: {dst.stat().st_size / 2**20:.1f} MiB (from {a.wheel.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
