"""Randomly initialised checkpoints in each s3prl upstream's own format (run in the s3prl env).

Usage: ``.venv-s3prl/bin/python tests/s3prl_checkpoints.py OUT_DIR`` writes ``<upstream>.ckpt`` for
APC, VQ-APC, NPC, TERA and DeCoAR 2.0, built with s3prl's own model classes so each loads through
that upstream's ``UpstreamExpert`` exactly like a published checkpoint (same keys, same config).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

FBANK = {"feat_type": "fbank", "feat_dim": 80, "frame_length": 25, "frame_shift": 10, "dither": 0.0, "cmvn": True}


def _apc(vq: bool) -> dict:
    from s3prl.upstream.apc.apc import APC

    paras = {"num_layers": 3, "hidden_size": 512, "dropout": 0.1, "residual": True}
    if vq:
        paras["vq"] = {"codebook_size": [128], "code_dim": [512], "gumbel_temperature": 0.5}
    config = {"data": {"audio": dict(FBANK)}, "model": {"paras": paras}}
    return {"config": config, "model": APC(80, **paras).state_dict()}


def _npc() -> dict:
    from s3prl.upstream.npc.npc import NPC

    paras = {"hidden_size": 512, "n_blocks": 4, "dropout": 0.1, "residual": True, "kernel_size": 15, "mask_size": 5}
    return {"config": {"data": {"audio": dict(FBANK)}, "model": {"paras": paras}}, "model": NPC(80, **paras).state_dict()}


def _tera() -> dict:
    from s3prl.upstream.mockingjay.model import TransformerConfig, TransformerModel

    transformer = {"hidden_size": 768, "num_hidden_layers": 3, "num_attention_heads": 12, "hidden_act": "gelu",
                   "intermediate_size": 3072, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
                   "initializer_range": 0.02, "layer_norm_eps": 1e-12, "share_layer": False, "pre_layer_norm": False}
    audio = {"kaldi": {"feat_type": "fbank", "fbank": {"num_mel_bins": 80, "frame_length": 25, "frame_shift": 10,
                                                        "dither": 0.0}},
             "delta": {"order": 0}, "cmvn": {"use_cmvn": True}}
    upstream = {"transformer": transformer, "audio": audio, "task": {"sequence_length": 0}}
    model = TransformerModel(TransformerConfig(transformer), 80)
    return {"Config": {}, "Upstream_Config": upstream, "Transformer": model.state_dict()}


def _decoar2() -> dict:
    from s3prl.upstream.decoar2.decoar2 import Decoar2

    return {"model": Decoar2().state_dict()}


BUILDERS = {"apc": lambda: _apc(False), "vq_apc": lambda: _apc(True), "npc": _npc, "tera": _tera, "decoar2": _decoar2}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, build in BUILDERS.items():
        torch.manual_seed(0)
        torch.save(build(), out / f"{name}.ckpt")
        print(out / f"{name}.ckpt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
