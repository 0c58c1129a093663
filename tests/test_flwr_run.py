"""The README's `flwr run` lines work as printed: Flower's own local simulation, no package index."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent


def _readme_flwr_block() -> list[str]:
    block = next(b for b in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S) if "flwr run ." in b)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_the_readmes_flwr_run_lines_run_as_printed(corpora, feature_cache, tmp_path):
    lines = _readme_flwr_block()
    assert lines[0].startswith("P=$(.venv/bin/fed-ser-prepare dataset=crema_d")
    cfg = load_config([f"data.root={corpora}", "data.scale=0.05", "data.seed=3", f"data.cache={feature_cache}",
                       f"data.prepared_dir={tmp_path / 'prepared'}", "dataset=crema_d"])
    prepared = prepare(cfg, ["crema_d"], 0).resolve()  # the same 72 clients, at a small scale
    # its store in its own folder too (pyproject's recorder.dir is the project's runs/flwr-run)
    settings = f"fl.rounds=2 out_dir='{tmp_path / 'run'}' recorder.dir='{tmp_path / 'run' / 'updates'}'"
    run = lines[2].replace("'$P'", f"'{prepared}'").replace("fl.rounds=5", settings)
    script = "\n".join(["set -e", f"cd {ROOT}", lines[1], run])
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr_home"), "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}
    try:
        res = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(["bash", "-c", lines[3]], env=env, capture_output=True)  # the README's clean-up line
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "72 nodes connected" in out and "round 2/2: 7/7 replies" in out, out[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["final"]["round"] == 2
    for _ in range(40):  # it shuts down gracefully after SIGTERM
        if subprocess.run(["pgrep", "-f", "flower-superlink --insecure --simulation"], capture_output=True).returncode:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the local simulation SuperLink outlived the README's clean-up line")
