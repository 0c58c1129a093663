"""Several ``fed-ser-extract`` runs in one process of the s3prl env (run there by tests/test_ssl.py).

Usage: ``.venv-s3prl/bin/python tests/s3prl_extract.py JOBS.json OUT.json [CKPT_DIR]``; with ``CKPT_DIR``, the
randomly initialised checkpoints of tests/s3prl_checkpoints.py are written there first. ``JOBS`` is a list of
``{"id": ..., "args": [override, ...], "cache": folder}``; each job calls the function the console
script ``fed-ser-extract`` runs, with those overrides, in order (an upstream's run, then its cached
re-run, ...). ``OUT`` maps each job's id to its seconds, the modification time of every file in its
cache folder after it, and its error (``None`` when it succeeded): a failed job does not stop the others,
so each upstream's test reports its own failure. One process pays for importing torch and s3prl once.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

from fed_ser.experiments.scripts import extract_main


def main(jobs: Path, out: Path, checkpoints: Path | None = None) -> None:
    if checkpoints is not None:
        from s3prl_checkpoints import main as write_checkpoints  # this script's folder is on sys.path

        write_checkpoints(checkpoints)
    done = {}
    for job in json.loads(jobs.read_text()):
        t0, error = time.perf_counter(), None
        try:
            extract_main(job["args"])
        except BaseException as exc:  # SystemExit included: fed-ser-extract exits on failed utterances
            error = "".join(traceback.format_exception(exc))[-3000:]
        stamps = {str(p): p.stat().st_mtime_ns for p in Path(job["cache"]).rglob("*.npy")}
        done[job["id"]] = {"seconds": time.perf_counter() - t0, "stamps": stamps, "error": error}
    out.write_text(json.dumps(done))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
