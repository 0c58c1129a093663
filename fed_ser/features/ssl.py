"""Self-supervised speech representations from s3prl upstreams (APC, VQ-APC, NPC, TERA, DeCoAR 2.0).

One vector per utterance: the upstream's **last hidden state averaged over time** (the paper's
pooling), 512 dims for APC / VQ-APC / NPC and 768 for TERA / DeCoAR 2.0.

s3prl needs torchaudio, which loads only beside its matching torch (2.9.1), while fed-ser's main
environment runs torch 2.13. So extraction is a **separate step in its own environment**
(``fed-ser-s3prl-env`` builds ``.venv-s3prl``; ``.venv-s3prl/bin/fed-ser-extract features=apc``
fills the feature cache), and the main pipeline only *reads* that cache: the cache key is the
audio file's hash plus the checkpoint's hash, neither of which needs s3prl to compute. Where
s3prl is not importable the extractor is cache-only and an uncached utterance fails with the
command that extracts it.

Checkpoints are never downloaded: ``features.ckpt`` names a local file, or, left empty, the file
s3prl itself caches after a download (``~/.cache/s3prl/download/<sha256(url)>.<name>``). A
missing file stops with that path and the way to obtain it on a machine with internet.
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path

import numpy as np

from fed_ser.features.extract import file_digest


@dataclass(frozen=True)
class UpstreamSpec:
    """Where an upstream lives in s3prl, its output size and its published checkpoint."""

    name: str
    expert_module: str  # s3prl module whose UpstreamExpert(ckpt) loads the checkpoint
    dim: int
    url: str  # s3prl's default checkpoint for this upstream (what its hub downloads)


_HF = "https://huggingface.co"
UPSTREAMS: dict[str, UpstreamSpec] = {
    "apc": UpstreamSpec("apc", "s3prl.upstream.apc.expert", 512,
                        f"{_HF}/leo19941227/apc_series/resolve/main/apc_360hr.ckpt"),
    "vq_apc": UpstreamSpec("vq_apc", "s3prl.upstream.vq_apc.expert", 512,
                           f"{_HF}/leo19941227/apc_series/resolve/main/vq_apc_360hr.ckpt"),
    "npc": UpstreamSpec("npc", "s3prl.upstream.npc.expert", 512,
                        f"{_HF}/leo19941227/apc_series/resolve/main/npc_360hr.ckpt"),
    "tera": UpstreamSpec("tera", "s3prl.upstream.tera.expert", 768,
                         f"{_HF}/s3prl/tera/resolve/main/tera_logMelBase_T_F_M_AdamW_b32_1m_960hr_drop1/states-1000000.ckpt"),
    "decoar2": UpstreamSpec("decoar2", "s3prl.upstream.decoar2.expert", 768,
                            f"{_HF}/s3prl/converted_ckpts/resolve/main/checkpoint_decoar2.pt"),
}


def s3prl_cache_path(url: str) -> Path:
    """The file s3prl's downloader keeps for ``url`` (same naming as ``s3prl.util.download``)."""
    return Path.home() / ".cache" / "s3prl" / "download" / f"{hashlib.sha256(url.encode()).hexdigest()}.{Path(url).name}"


def checkpoint_path(name: str, ckpt: str | None) -> Path:
    """The checkpoint file for upstream ``name``: ``ckpt`` if given, else s3prl's cached download.

    Raises ``FileNotFoundError`` naming the expected file and how to obtain it.
    """
    spec = upstream_spec(name)
    path = Path(ckpt).expanduser() if ckpt else s3prl_cache_path(spec.url)
    if not path.is_file():
        raise FileNotFoundError(
            f"features.ckpt: the {name} checkpoint {path} does not exist. Nothing is downloaded here. On a "
            f"machine with internet, fetch {spec.url} (or run `python -c \"import s3prl.hub as h; h.{name}()\"`, "
            f"which stores it under ~/.cache/s3prl/download/), copy the file here and pass features.ckpt=<path> "
            f"(or place it at {s3prl_cache_path(spec.url)}).")
    return path


def upstream_spec(name: str) -> UpstreamSpec:
    if name not in UPSTREAMS:
        raise KeyError(f"features.name: unknown s3prl upstream {name!r}; available: {sorted(UPSTREAMS)}")
    return UPSTREAMS[name]


@cache
def _checkpoint_digest(path: str) -> str:
    return file_digest(path)[:16]


def s3prl_available() -> bool:
    """Whether this environment can run s3prl upstreams (torch + matching torchaudio + s3prl)."""
    try:
        importlib.import_module("s3prl.upstream.interfaces")
    except Exception:  # ImportError, or torchaudio failing against a mismatched torch
        return False
    return True


class S3prlUpstream:
    """Mean-pooled last hidden state of an s3prl upstream (the :class:`FeatureExtractor` protocol).

    ``version`` is the checkpoint's content hash, so the cache entry is the same whichever
    environment computes the key. With ``load=False`` (no s3prl here) the object only names the
    cache; calling it raises with the command that extracts the features.
    """

    def __init__(self, name: str, ckpt: str | None = None, load: bool = True):
        spec = upstream_spec(name)
        self.name, self.dim = spec.name, spec.dim
        self.ckpt = checkpoint_path(name, ckpt)
        self.version = f"mean-last-{_checkpoint_digest(str(self.ckpt))}"
        self._expert = None
        if load:
            import torch

            if name == "tera":
                _fast_sinusoid_table()
            expert_cls = importlib.import_module(spec.expert_module).UpstreamExpert
            try:
                self._expert = expert_cls(str(self.ckpt)).eval()
            except Exception as exc:
                raise ValueError(f"features.ckpt: {self.ckpt} is not a loadable {name} checkpoint "
                                 f"({type(exc).__name__}: {exc})") from exc
            torch.set_num_threads(1)  # one utterance per worker process; the pool supplies parallelism

    def __call__(self, wave: np.ndarray, rate: int) -> np.ndarray:
        if self._expert is None:
            raise RuntimeError(f"{self.name} features are not in the cache and s3prl is not installed in this "
                               f"environment: run `.venv-s3prl/bin/fed-ser-extract features={self.name}` first "
                               f"(environment: `fed-ser-s3prl-env`)")
        import torch

        from fed_ser.data.audio import resample

        wave = resample(wave, rate, 16_000)  # every upstream was trained on 16 kHz speech
        with torch.no_grad():
            hidden = self._expert([torch.as_tensor(wave, dtype=torch.float32)])["hidden_states"][-1]
        return hidden[0].mean(0).double().numpy()


def _fast_sinusoid_table() -> None:
    """Swap s3prl's TERA position table (built with 18 M Python calls, once per extraction worker) for
    the same table computed with numpy (benchmarks/README.md: what each costs)."""
    import torch
    from s3prl.upstream.mockingjay import builder

    if getattr(builder.get_sinusoid_table, "_fed_ser", False):
        return

    @lru_cache(maxsize=8)
    def table(hidden_size: int) -> torch.Tensor:
        pos = np.arange(builder.MAX_SEQLEN, dtype=np.float64)[:, None]
        angle = pos / np.power(10000, 2 * (np.arange(hidden_size) // 2) / hidden_size)
        angle[:, 0::2], angle[:, 1::2] = np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])
        return torch.FloatTensor(angle)

    table._fed_ser = True  # type: ignore[attr-defined]
    builder.get_sinusoid_table = table


@dataclass(frozen=True)
class UpstreamFactory:
    """Picklable, hashable factory: each worker process builds the upstream once."""

    name: str
    ckpt: str | None = None
    load: bool = True

    def __call__(self) -> S3prlUpstream:
        return S3prlUpstream(self.name, self.ckpt, self.load)
