"""Emo-Base (openSMILE, 988 functionals) extraction throughput, per core and across cores.

Extracts the first N utterances of a synthetic corpus into an empty cache with 1 worker and with
every core, then reads them back from the cache. Prints utterances per second per core, the
real-time factor and the parallel efficiency (ratio of the two rates per core).

    python benchmarks/emobase_throughput.py [--n 400] [dataset=iemocap]
"""

from __future__ import annotations

import os
import tempfile
import time

import soundfile as sf
from _common import parser, report

from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import corpus_manifest, corpus_source
from fed_ser.features.emobase import emobase_factory
from fed_ser.features.extract import extract_features


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--n", type=int, default=400)
    args = p.parse_args()
    cfg = load_config(["dataset=iemocap", *args.overrides])
    paths = corpus_manifest(cfg, corpus_source(cfg, str(cfg.dataset.name)))[0].path.tolist()[: args.n]
    audio_s = sum(sf.info(p).duration for p in paths)
    cores = os.cpu_count() or 1
    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workers in (1, cores):
            t = time.perf_counter()
            extract_features(paths, emobase_factory, f"{tmp}/w{workers}", workers=workers, desc=f"{workers} worker(s)")
            rates[workers] = len(paths) / (time.perf_counter() - t)
        t = time.perf_counter()
        extract_features(paths, emobase_factory, f"{tmp}/w1", workers=1, desc="cache")
        cached = len(paths) / (time.perf_counter() - t)
    numbers = {"utterances": len(paths), "audio_seconds": audio_s, "cores": cores, "utt_per_s_1": rates[1],
               "utt_per_s_all": rates[cores], "utt_per_s_per_core": rates[cores] / cores,
               "parallel_efficiency": rates[cores] / (cores * rates[1]), "cached_utt_per_s": cached,
               "real_time_factor_1": audio_s / len(paths) * rates[1]}
    report("Emo-Base extraction throughput", [
        ("utterances / audio", f"{len(paths)} / {audio_s:.0f} s"),
        ("1 worker", f"{rates[1]:.1f} utt/s  ({numbers['real_time_factor_1']:.0f}x real time)"),
        (f"{cores} workers", f"{rates[cores]:.1f} utt/s = {rates[cores] / cores:.1f} utt/s/core"),
        ("parallel efficiency", f"{numbers['parallel_efficiency']:.2f}  (per-core rate, all cores / one)"),
        ("cache hits", f"{cached:.0f} utt/s  ({cached / rates[1]:.0f}x extraction)"),
    ], args.json, numbers)


if __name__ == "__main__":
    main()
