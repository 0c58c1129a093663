"""A deployed round (SuperLink + SuperNodes over TLS on 127.0.0.1) with warm app processes vs Flower's own.

``fed-ser-deploy`` twice with the same settings (3 nodes, 5 rounds by default): app processes forked
from the fork server (``deploy.warm_apps=true``, the default) and Flower's own processes, which
import Python, Flower and torch for every message (``deploy.warm_apps=false``); then the same
settings in Flower's simulation engine. Prints seconds a round of each (the issue's target: <= 1 s a
round deployed) and how long the warm run's ClientApp processes lived (the fork server's log).
The floor on Flower 1.41: a SuperNode that finds no message sleeps a fixed 3 s, and it finds none
right after sending its reply, so every message round waits ~3 s whatever the app does.

    python benchmarks/deploy_round.py [deploy.nodes=3] [fl.rounds=5] [--json FILE]
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from _common import parser, report

from fed_ser.experiments.config import load_config
from fed_ser.experiments.deploy import deploy


def main() -> None:
    args = parser(__doc__).parse_args()
    runs = {}
    for warm in (True, False):
        # each mode records into its own out_dir, and a rerun of the benchmark replaces what the last one recorded
        cfg = load_config([f"out_dir=runs/deploy/bench-{'warm' if warm else 'cold'}", "recorder.overwrite=true", *args.overrides,
                           f"deploy.warm_apps={str(warm).lower()}", f"deploy.compare_simulation={str(warm).lower()}"], "deploy")
        log_file = Path(cfg.deploy.workdir) / "forkserver.log"  # appended to by every run in this workdir
        offset = log_file.stat().st_size if log_file.exists() else 0
        runs[warm] = deploy(cfg)
        if warm:
            log = log_file.read_bytes()[offset:].decode("utf-8", "replace")
            command = dict((pid, cmd) for cmd, pid in re.findall(r"(flwr-\w+) as pid (\d+)", log))
            lived = [float(t) for pid, t in re.findall(r"pid (\d+) exited -?\d+ after ([0-9.]+) s", log)
                     if command.get(pid) == "flwr-clientapp"]
    warm, cold = runs[True]["deployment"], runs[False]["deployment"]
    sim = runs[True]["simulation"]
    numbers = {"warm": warm, "cold": cold, "simulation": sim, "forked_process_s": lived}
    report("A deployed round: warm app processes vs Flower's own", [
        ("nodes / rounds", f"{runs[True]['nodes']} / {runs[True]['rounds']} (TLS: {runs[True]['tls']})"),
        ("warm (deploy.warm_apps=true)", f"{warm['seconds_per_round']:.2f} s a round (issue's target <= 1 s; floor ~3.5 s, below)"),
        ("Flower's own processes", f"{cold['seconds_per_round']:.2f} s a round: {cold['seconds_per_round'] / warm['seconds_per_round']:.2f}x the warm"),
        ("simulation, same settings", f"{sim['seconds_per_round']:.2f} s a round"),
        ("forked ClientApp processes", f"{len(lived)}, median {statistics.median(lived):.2f} s from fork to exit "
                                       "(pull, FAB, app import, work, reply; three at once on the nodes)" if lived else "none logged"),
        ("floor", "a SuperNode sleeps a fixed 3 s when it finds no message (flwr/supernode/start_client_internal.py)"),
    ], args.json, numbers)


if __name__ == "__main__":
    main()
