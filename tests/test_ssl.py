"""s3prl upstreams (APC, VQ-APC, NPC, TERA, DeCoAR 2.0): extraction in the optional environment
from randomly initialised checkpoints in each upstream's own format, then FL on the features in
the main environment. Needs ``.venv-s3prl`` (``fed-ser-s3prl-env``; the README's test command
builds it); the checks that need no s3prl run everywhere."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fed_ser.data.corpora import load_corpus
from fed_ser.data.federated import FederatedData
from fed_ser.engines.vectorized import run_vectorized
from fed_ser.experiments.config import load_config
from fed_ser.experiments.prepare import prepare
from fed_ser.features.extract import cache_path, file_digest
from fed_ser.features.ssl import UPSTREAMS, S3prlUpstream, checkpoint_path
from fed_ser.recording.recorder import UpdateRecorder
from fed_ser.recording.store import UpdateStore
from fed_ser.run.settings import RunSettings
from fed_ser.tools import s3prl_env as ssl_env

ROOT = Path(__file__).resolve().parents[1]
ENV = ROOT / ".venv-s3prl" / "bin"
# The s3prl env must see only its own packages: earlier tests (Ray) can leave PYTHONPATH pointing
# at the main environment's torch 2.13 in this process's environment.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
_SKIPPED = ROOT / ".venv-s3prl.skipped"  # written by `fed-ser-s3prl-env --optional` when it gave up
needs_env = pytest.mark.skipif(
    not (ENV / "fed-ser-extract").exists(),
    reason="no .venv-s3prl: " + (_SKIPPED.read_text().strip() if _SKIPPED.exists()
                                 else "build it with `.venv/bin/fed-ser-s3prl-env`"))


def _overrides(name: str, ckpt: Path, corpora: Path, cache: Path, prepared: Path | None = None) -> list[str]:
    out = [f"features={name}", f"features.ckpt={ckpt}", f"data.root={corpora}", "data.scale=0.05", "data.seed=3",
           f"data.cache={cache}", "data.workers=2"]
    return out + ([f"data.prepared_dir={prepared}"] if prepared else [])


LIMIT = 8  # utterances per upstream: enough for shape, spread and determinism


def _extract(name, ckpt, corpora, cache, corpus: str) -> None:
    """``fed-ser-extract`` as its console script runs it: every utterance of ``corpus``."""
    run = subprocess.run([str(ENV / "fed-ser-extract"), *_overrides(name, ckpt, corpora, cache), f"corpora=[{corpus}]"],
                         capture_output=True, text=True, env=CLEAN_ENV)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.fixture(scope="module")
def s3prl_run(corpora, tmp_path_factory) -> tuple[dict[str, Path], Path, dict]:
    """One process of the s3prl env (tests/s3prl_extract.py), which loads torch and s3prl once: it writes each
    upstream's checkpoint (tests/s3prl_checkpoints.py), then runs fed-ser-extract for each upstream into a fresh
    cache, again on that cache, and APC's once more into another fresh cache. Returns the checkpoints, the
    caches' folder and each run's record."""
    root = tmp_path_factory.mktemp("s3prl")
    checkpoints = {name: root / "ckpt" / f"{name}.ckpt" for name in UPSTREAMS}
    jobs = []
    for name in UPSTREAMS:
        for run, cache in [("first", "a"), ("again", "a")] + ([("fresh", "b")] if name == "apc" else []):
            folder = root / name / cache
            jobs.append({"id": f"{name}-{run}", "cache": str(folder),
                         "args": [*_overrides(name, checkpoints[name], corpora, folder), "corpora=[crema_d]", f"limit={LIMIT}"]})
    (root / "jobs.json").write_text(json.dumps(jobs))
    run = subprocess.run([str(ENV / "python"), str(ROOT / "tests" / "s3prl_extract.py"), str(root / "jobs.json"), str(root / "done.json"),
                          str(root / "ckpt")], capture_output=True, text=True, env=CLEAN_ENV)
    assert run.returncode == 0, run.stderr[-3000:]
    return checkpoints, root, json.loads((root / "done.json").read_text())


def _cached(name, ckpt, wavs, cache) -> np.ndarray:
    ex = S3prlUpstream(name, str(ckpt), load=False)  # names the cache entry without s3prl
    return np.stack([np.load(cache_path(cache, ex, file_digest(w))) for w in wavs])


@needs_env
@pytest.mark.parametrize("name", list(UPSTREAMS))
def test_upstream_extracts_mean_pooled_last_layer_deterministically_and_caches(name, s3prl_run, corpora):
    checkpoints, root, done = s3prl_run
    first, again = done[f"{name}-first"], done[f"{name}-again"]
    assert first["error"] is None, first["error"]
    wavs = load_corpus("crema_d", corpora / "crema_d")[0].path.tolist()[:LIMIT]
    X = _cached(name, checkpoints[name], wavs, root / name / "a")
    assert X.shape == (len(wavs), UPSTREAMS[name].dim) and np.isfinite(X).all()
    assert np.std(X, axis=0).max() > 0  # utterances differ
    assert len(first["stamps"]) == len(wavs)
    assert again["error"] is None, again["error"]
    assert again["stamps"] == first["stamps"]  # everything cached: nothing rewritten
    print(f"{name}: {len(wavs)} utterances extracted in {first['seconds']:.1f} s, cached re-run {again['seconds']:.1f} s")
    if name == "apc":  # a fresh cache gives the same vectors
        assert done["apc-fresh"]["error"] is None, done["apc-fresh"]["error"]
        assert np.array_equal(X, _cached(name, checkpoints[name], wavs, root / name / "b"))


@needs_env
def test_fl_pipeline_trains_on_s3prl_features(s3prl_run, tmp_path):
    checkpoints, corpora = s3prl_run[0], tmp_path / "corpora"
    # synthetic EmoDB, the smallest corpus (10 speakers, a few utterances each): fed-ser-extract writes it first
    _extract("npc", checkpoints["npc"], corpora, tmp_path / "cache", "emodb")
    cfg = load_config(_overrides("npc", checkpoints["npc"], corpora, tmp_path / "cache", tmp_path / "prep"))
    data = FederatedData.load(prepare(cfg, ["emodb"], fold=0))  # main env: read from the cache only
    assert data.X.shape[1] == 512
    store = UpdateStore(tmp_path / "updates", mode="a")
    s = RunSettings(prepared="", algorithm="fedsgd", rounds=5, fraction=0.3, lr=0.1)
    res = run_vectorized(data, s, UpdateRecorder(store, "fedsgd", 0.1), progress=False)
    assert len(store) == 5 * int(data.num_clients * 0.3)
    assert store.read(store.updates()[0])["dense1.weight"].shape == (256, 512)
    assert 0.0 <= res["final"]["test_uar"] <= 1.0


def test_missing_checkpoint_names_the_file_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/apc\.ckpt does not exist.*huggingface\.co.*apc_360hr"):
        checkpoint_path("apc", str(tmp_path / "nowhere" / "apc.ckpt"))
    with pytest.raises(KeyError, match="features.name"):
        checkpoint_path("wav2vec9", None)


def test_uncached_features_without_s3prl_fail_naming_the_extraction_step(corpora, tmp_path):
    ckpt = tmp_path / "tera.ckpt"
    ckpt.write_bytes(b"not extracted")  # exists, so the cache can be named; nothing is cached
    cfg = load_config(_overrides("tera", ckpt, corpora, tmp_path / "cache", tmp_path / "prep"))
    with pytest.raises(RuntimeError, match="fed-ser-extract features=tera"):
        prepare(cfg, ["crema_d"], fold=0)


def test_optional_env_build_without_room_skips_with_its_reason_and_creates_nothing(tmp_path):
    target = tmp_path / "env"
    ssl_env.main(["--optional", "--target", str(target), "--needed-gib", "1e9"])
    assert not target.exists()
    assert "GiB free" in ssl_env.skipped_marker(target).read_text()
    with pytest.raises(SystemExit, match="GiB free"):  # asked for directly, the same cause is an error
        ssl_env.main(["--target", str(target), "--needed-gib", "1e9"])


def test_failed_env_build_removes_the_half_built_environment(tmp_path, monkeypatch):
    # A requirement pip cannot satisfy (a missing local wheel: no network) stands in for a cut download.
    monkeypatch.setattr(ssl_env, "S3PRL_REQUIREMENTS", [str(tmp_path / "missing-0.0-py3-none-any.whl")])
    monkeypatch.setattr(ssl_env, "PIP_ATTEMPTS", 1)
    target = tmp_path / "env"
    with pytest.raises(ssl_env.EnvBuildError, match="pip could not install"):
        ssl_env.build(target, needed_gib=0.0)
    assert not target.exists() and not (tmp_path / "env.tmp").exists()
