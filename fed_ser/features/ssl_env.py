"""``fed-ser-s3prl-env``: build the optional environment that runs s3prl feature extraction.

s3prl needs torchaudio, and torchaudio loads only beside its matching torch (2.9.1 here), while
fed-ser itself pins torch 2.13. So the extraction runs in a second virtual environment,
``.venv-s3prl`` by default: the pinned torch/torchaudio/s3prl, the few light packages the
extraction path of fed-ser imports (numpy, scipy, soundfile, pandas, hydra, tqdm), and fed-ser
itself installed *without* its dependencies (no Flower, no torch 2.13 there). Its
``fed-ser-extract`` fills the shared feature cache that the main environment reads.
From PyPI torch 2.9.1 is the CUDA build: about 3 GB to download, 7 GB installed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

S3PRL_REQUIREMENTS = [
    "torch==2.9.1",
    "torchaudio==2.9.1",
    "s3prl==0.4.18",
    "numpy>=1.26",
    "scipy>=1.11",
    "soundfile>=0.12",
    "pandas>=2.0",
    "hydra-core==1.3.8",
    "tqdm>=4.66",
]
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build(target: Path, python: str = sys.executable) -> Path:
    """Create (or complete) the environment at ``target``; return its python. Idempotent."""
    t0 = time.perf_counter()
    if not (target / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(target)], check=True)
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *S3PRL_REQUIREMENTS], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(PROJECT_ROOT)], check=True)
    check = "from fed_ser.features.ssl import s3prl_available as a; import sys; sys.exit(0 if a() else 1)"
    if subprocess.run([str(target / "bin" / "python"), "-c", check]).returncode != 0:
        raise RuntimeError(f"{target}: s3prl does not import in the new environment")
    print(f"[fed-ser] s3prl environment ready at {target} ({_size(target) / 2**30:.1f} GiB, "
          f"{time.perf_counter() - t0:.0f} s); extract with {target}/bin/fed-ser-extract features=apc", flush=True)
    return target / "bin" / "python"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fed-ser-s3prl-env", description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=Path, default=PROJECT_ROOT / ".venv-s3prl",
                    help="where to create the environment (default: .venv-s3prl beside the project)")
    build(ap.parse_args(argv).target)


if __name__ == "__main__":
    main()
