"""``fed-ser-s3prl-env``: build the optional environment that runs s3prl feature extraction.

s3prl needs torchaudio, and torchaudio loads only beside its matching torch (2.9.1 here), while
fed-ser itself pins torch 2.13. So the extraction runs in a second virtual environment,
``.venv-s3prl`` by default: the pinned torch/torchaudio/s3prl, the few light packages the
extraction path of fed-ser imports (numpy, scipy, soundfile, pandas, hydra, tqdm), and fed-ser
itself installed *without* its dependencies (no Flower, no torch 2.13 there). Its
``fed-ser-extract`` fills the shared feature cache that the main environment reads.
From PyPI torch 2.9.1 is the CUDA build: about 3 GB to download, 7 GB installed, so the build
first checks that the disk has room for both, and keeps pip's downloads beside the target (one
file system to check) instead of in ``/tmp``.

``--optional`` is what the README's test command uses: a build that cannot finish (no room, a
download cut off) removes what it half-built, says why on stderr and in ``<target>.skipped``,
and exits 0, so the suite still runs and the s3prl tests skip quoting that reason.
"""

from __future__ import annotations

import argparse
import os
import shutil
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
# Measured: 7.2 GiB installed + ~3 GiB of wheels held until pip finishes, plus a margin.
NEEDED_GIB = 11.0
PIP_ATTEMPTS = 2


class EnvBuildError(RuntimeError):
    """The s3prl environment could not be built; the message says why and where."""


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def skipped_marker(target: Path) -> Path:
    """Where an ``--optional`` build that gave up records why (read by the s3prl tests)."""
    return target.with_name(target.name + ".skipped")


def _ready(target: Path) -> bool:
    python = target / "bin" / "python"
    check = "from fed_ser.features.ssl import s3prl_available as a; import sys; sys.exit(0 if a() else 1)"
    return python.exists() and (target / "bin" / "fed-ser-extract").exists() and subprocess.run(
        [str(python), "-c", check], capture_output=True).returncode == 0


def _check_room(target: Path, needed_gib: float) -> None:
    probe = target if target.exists() else target.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free < needed_gib:
        raise EnvBuildError(f"{target}: only {free:.1f} GiB free on its disk, the s3prl environment needs about "
                            f"{needed_gib:.0f} GiB (torch 2.9.1 from PyPI is the CUDA build)")


def build(target: Path, python: str = sys.executable, needed_gib: float = NEEDED_GIB) -> Path:
    """Create (or complete) the environment at ``target``; return its python. Idempotent.

    Raises :class:`EnvBuildError` naming the cause; an environment this call started is removed
    again, so a later run never mistakes half an install for a working one.
    """
    t0 = time.perf_counter()
    target = target.resolve()
    if _ready(target):
        # the project itself is refreshed: its console scripts name modules that may have moved since
        if subprocess.run([str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
                           "--no-deps", "-e", str(PROJECT_ROOT)]).returncode != 0:
            print(f"[fed-ser] could not refresh fed-ser in {target}; its console scripts may be stale", file=sys.stderr)
        print(f"[fed-ser] s3prl environment already complete at {target}", flush=True)
        return target / "bin" / "python"
    fresh = not target.exists()
    if fresh:
        _check_room(target, needed_gib)
    scratch = target.with_name(target.name + ".tmp")
    try:
        if not (target / "bin" / "python").exists():
            subprocess.run([python, "-m", "venv", str(target)], check=True)
        scratch.mkdir(exist_ok=True)
        env = {**os.environ, "TMPDIR": str(scratch)}
        pip = [str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-q",
               "--no-cache-dir"]
        for attempt in range(1, PIP_ATTEMPTS + 1):
            if subprocess.run([*pip, *S3PRL_REQUIREMENTS], env=env).returncode == 0:
                break
            if attempt == PIP_ATTEMPTS:
                raise EnvBuildError(f"{target}: pip could not install {' '.join(S3PRL_REQUIREMENTS[:3])} "
                                    f"({PIP_ATTEMPTS} attempts; its error is above)")
            print(f"[fed-ser] pip failed (attempt {attempt}/{PIP_ATTEMPTS}); retrying", file=sys.stderr, flush=True)
        subprocess.run([*pip, "--no-deps", "-e", str(PROJECT_ROOT)], check=True, env=env)
        if not _ready(target):
            raise EnvBuildError(f"{target}: s3prl does not import in the new environment")
    except (EnvBuildError, subprocess.CalledProcessError, OSError) as err:
        if fresh:
            shutil.rmtree(target, ignore_errors=True)
        if not isinstance(err, EnvBuildError):
            err = EnvBuildError(f"{target}: {err}")
        raise err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    skipped_marker(target).unlink(missing_ok=True)
    print(f"[fed-ser] s3prl environment ready at {target} ({_size(target) / 2**30:.1f} GiB, "
          f"{time.perf_counter() - t0:.0f} s); extract with {target}/bin/fed-ser-extract features=apc", flush=True)
    return target / "bin" / "python"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="fed-ser-s3prl-env", description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=Path, default=PROJECT_ROOT / ".venv-s3prl",
                    help="where to create the environment (default: .venv-s3prl beside the project)")
    ap.add_argument("--optional", action="store_true",
                    help="if the build cannot finish, say why and exit 0 (the s3prl tests then skip)")
    ap.add_argument("--needed-gib", type=float, default=NEEDED_GIB,
                    help=f"free disk a fresh build insists on (default {NEEDED_GIB:.0f})")
    args = ap.parse_args(argv)
    try:
        build(args.target, needed_gib=args.needed_gib)
    except EnvBuildError as err:
        if not args.optional:
            sys.exit(f"[fed-ser] error: {err}")
        marker = skipped_marker(args.target.resolve())
        marker.write_text(f"{err}\n")
        print(f"[fed-ser] WARNING: the optional s3prl environment was not built: {err}\n"
              f"[fed-ser] the s3prl extraction tests will skip (reason in {marker})", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
