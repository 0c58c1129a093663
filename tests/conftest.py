"""Shared fixtures: small synthetic corpora in the real layouts, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fed_ser.data.synthetic import generate


@pytest.fixture(scope="session")
def corpora(tmp_path_factory) -> Path:
    """CREMA-D, IEMOCAP and MSP-Improv trees at ~5% of the real size (all real speakers)."""
    root = tmp_path_factory.mktemp("corpora")
    for corpus in ("crema_d", "iemocap", "msp_improv"):
        generate(root / corpus, corpus, scale=0.05, seed=3)
    return root


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")
