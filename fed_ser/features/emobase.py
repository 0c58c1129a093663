"""openSMILE Emo-Base functionals (988 per utterance), the paper's hand-crafted feature set."""

from __future__ import annotations

import numpy as np


class EmoBase:
    """Emo-Base functionals of one utterance via the ``opensmile`` package (runs offline)."""

    name = "emobase"
    dim = 988

    def __init__(self) -> None:
        import opensmile

        self._smile = opensmile.Smile(
            feature_set=opensmile.FeatureSet.emobase,
            feature_level=opensmile.FeatureLevel.Functionals,
        )
        self.version = f"opensmile{opensmile.__version__}"

    def __call__(self, wave: np.ndarray, rate: int) -> np.ndarray:
        return self._smile.process_signal(wave, rate).to_numpy().reshape(-1)


def emobase_factory() -> EmoBase:
    """Picklable factory for worker processes."""
    return EmoBase()


def feature_names() -> list[str]:
    """The 988 functionals' names, in the order :class:`EmoBase` returns them."""
    import opensmile

    return list(opensmile.Smile(feature_set=opensmile.FeatureSet.emobase,
                                feature_level=opensmile.FeatureLevel.Functionals).feature_names)
