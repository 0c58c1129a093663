"""Source-filter voice model used to synthesise emotional speech.

Why a synthesiser: no real corpus can be downloaded where fed-ser is built and tested, yet the
attack only makes sense if the features carry the same *kind* of structure as real speech:

* speakers differ in F0, vocal-tract length (formant scaling, larger between genders), jitter,
  shimmer and breathiness, so per-speaker z-normalisation removes most static identity cues;
* emotions shift F0 level and range, energy, speaking rate, spectral tilt and breathiness;
* *how* an emotion is expressed differs by gender (a gender-by-emotion interaction), which is the
  only gender cue that survives per-speaker z-normalisation. It is small next to the
  utterance-to-utterance variability, so a single utterance says little about gender while the
  emotion-conditional mean over many utterances (what a gradient carries) says a lot.

The waveform is a glottal pulse train (jittered periods, shimmered amplitudes) shaped by a
spectral-tilt low-pass, mixed with aspiration noise, passed through a cascade of formant
resonators per syllable, then radiated (first difference) and enveloped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

SAMPLE_RATE = 16_000
EMOTIONS = ("neutral", "happy", "sad", "angry")

# Vowel formants (F1, F2, F3, F4) of an adult male vocal tract, Hz (Peterson & Barney style).
_VOWELS = np.array(
    [
        [730, 1090, 2440, 3400],  # a
        [270, 2290, 3010, 3700],  # i
        [300, 870, 2240, 3300],  # u
        [530, 1840, 2480, 3500],  # e
        [570, 840, 2410, 3300],  # o
        [660, 1720, 2410, 3500],  # ae
        [440, 1020, 2240, 3300],  # schwa-like
    ],
    dtype=np.float64,
)
_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0])


@dataclass(frozen=True)
class Prosody:
    """Emotion-driven changes relative to the speaker's neutral voice."""

    f0_semitones: float = 0.0  # mean F0 shift
    f0_range: float = 1.0  # multiplier of intonation excursions
    energy_db: float = 0.0
    rate: float = 1.0  # syllables per second multiplier
    tilt: float = 0.0  # >0: flatter spectrum (pressed/tense voice), <0: steeper (lax)
    breathiness: float = 0.0  # added aspiration noise share
    formant_shift: float = 0.0  # relative formant shift (smiling raises, sadness lowers)

    def __add__(self, other: Prosody) -> Prosody:
        return Prosody(
            self.f0_semitones + other.f0_semitones,
            self.f0_range * other.f0_range,
            self.energy_db + other.energy_db,
            self.rate * other.rate,
            self.tilt + other.tilt,
            self.breathiness + other.breathiness,
            self.formant_shift + other.formant_shift,
        )

    def scaled(self, k: float) -> Prosody:
        """The same change with strength ``k`` (0 = neutral, 1 = as defined)."""
        return Prosody(
            k * self.f0_semitones,
            float(self.f0_range**k),
            k * self.energy_db,
            float(self.rate**k),
            k * self.tilt,
            k * self.breathiness,
            k * self.formant_shift,
        )


# Shared emotion effects (both genders).
EMOTION_PROSODY: dict[str, Prosody] = {
    "neutral": Prosody(),
    "happy": Prosody(2.5, 1.45, 3.0, 1.08, 0.25, 0.0, 0.03),
    "sad": Prosody(-1.5, 0.6, -4.5, 0.82, -0.35, 0.06, -0.02),
    "angry": Prosody(2.0, 1.25, 7.0, 1.12, 0.55, -0.02, 0.01),
}

# Gender-specific expression styles, added on top of the shared effect with strength
# ``gender_style`` (data.gender_style). Small next to the per-utterance variability on purpose:
# a single utterance must say little about gender; the strength sets how much a client's
# update (a sum over a batch) leaks.
DEFAULT_GENDER_STYLE = 2.0
GENDER_STYLE: dict[str, dict[str, Prosody]] = {
    "F": {
        "neutral": Prosody(),
        "happy": Prosody(1.2, 1.2, -0.6, 1.03, -0.1, 0.02, 0.015),
        "sad": Prosody(0.4, 1.0, 0.0, 0.94, -0.1, 0.04, 0.0),
        "angry": Prosody(0.9, 1.1, -1.3, 1.0, -0.1, 0.0, 0.0),
    },
    "M": {
        "neutral": Prosody(),
        "happy": Prosody(-0.6, 0.88, 0.8, 1.0, 0.08, 0.0, -0.01),
        "sad": Prosody(-0.6, 0.92, -1.0, 1.0, 0.0, -0.01, 0.0),
        "angry": Prosody(-0.3, 0.9, 1.6, 1.04, 0.18, -0.01, 0.0),
    },
}


@dataclass(frozen=True)
class Voice:
    """One voice model: the emotions' shared prosody, the genders' styles, and how the level is set."""

    emotion: dict[str, Prosody]
    style: dict[str, dict[str, Prosody]]
    peak: float | None = None  # None: level from the emotion's energy; else every utterance's peak is this


# A voice calibrated against real recordings (``data.voice=emodb``, the spec ``f0:...``). Measured on
# real EmoDB speakers (openSMILE Emo-Base ``F0env_sma_amean`` in semitones, each speaker's emotion mean
# against its neutral mean), the designed voice is unlike real speech in two ways, and only those are
# changed: both genders raise F0 by several semitones in happy and angry speech while the designed
# voice's men barely move, and the copy's files are level-normalised (the designed voice sets the level
# from the emotion). A calibrated voice takes the measured F0 changes as its parameters (shared change:
# the genders' mean; style: their half difference, F0 only) and normalises every utterance's peak.
# Which speakers it is measured on is the experiment's business, never the speakers it then attacks
# (:func:`fed_ser.experiments.prepare.resolve_voice`).
CALIBRATED_EMOTIONS = ("happy", "sad", "angry")


def calibrated_spec(f0: dict[str, dict[str, float]]) -> str:
    """The voice spec string of measured F0 changes ``f0[gender][emotion]`` (semitones against neutral,
    rounded to 0.1): what ``data.voice`` and a synthetic corpus's stamp hold."""
    parts = [f"{g}=" + ",".join(f"{e}{f0[g][e]:+.1f}" for e in CALIBRATED_EMOTIONS) for g in ("F", "M")]
    return "f0:" + ";".join(parts)


def _parse_spec(spec: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for part in spec[3:].split(";"):
        g, _, values = part.partition("=")
        out[g] = {m.group(1): float(m.group(2)) for m in re.finditer(r"([a-z]+)([+-]\d+(?:\.\d+)?)", values)}
    if set(out) != {"F", "M"} or any(set(v) != set(CALIBRATED_EMOTIONS) for v in out.values()):
        raise ValueError(f"voice spec {spec!r} is not shaped like 'f0:F=happy+7.7,sad-1.7,angry+7.4;M=happy+5.3,sad+1.3,angry+6.1'")
    return out


def calibrated_voice(f0: dict[str, dict[str, float]]) -> Voice:
    """The voice whose F0 changes per gender and emotion are the measured ``f0``; the rest is the designed voice's."""
    emotion, style = dict(EMOTION_PROSODY), {"F": {"neutral": Prosody()}, "M": {"neutral": Prosody()}}
    for e in CALIBRATED_EMOTIONS:
        shared, half = (f0["F"][e] + f0["M"][e]) / 2, (f0["F"][e] - f0["M"][e]) / 2
        p = EMOTION_PROSODY[e]
        emotion[e] = Prosody(shared, p.f0_range, p.energy_db, p.rate, p.tilt, p.breathiness, p.formant_shift)
        style["F"][e], style["M"][e] = Prosody(half), Prosody(-half)
    return Voice(emotion, style, peak=0.5)


#: Named voices: ``designed`` (fed-ser's first voice). A calibrated voice is named by its spec (``f0:...``).
VOICES: dict[str, Voice] = {"designed": Voice(EMOTION_PROSODY, GENDER_STYLE)}


def check_voice(voice: str) -> Voice:
    """The voice named or specified by ``voice``; a ValueError naming the choices otherwise."""
    if voice in VOICES:
        return VOICES[voice]
    if voice.startswith("f0:"):
        return calibrated_voice(_parse_spec(voice))
    raise ValueError(f"voice must be one of {sorted(VOICES)} or a calibrated spec 'f0:F=happy+7.7,...;M=...', got {voice!r}")


@dataclass(frozen=True)
class Speaker:
    """A synthetic speaker's voice parameters."""

    speaker_id: str
    gender: str  # "F" or "M"
    f0_hz: float
    formant_scale: float  # vocal-tract length: >1 shorter tract, higher formants
    jitter: float  # relative period perturbation
    shimmer: float  # relative amplitude perturbation (log-normal sigma)
    breathiness: float  # aspiration noise share
    expressivity: float  # how strongly this speaker expresses emotion
    tilt: float  # speaker's habitual spectral tilt
    gender_style: float = 1.0  # strength of the gender-specific expression style (GENDER_STYLE)
    voice: str = "designed"  # the voice model (VOICES)


def sample_speaker(speaker_id: str, gender: str, rng: np.random.Generator, gender_style: float = 1.0,
                   voice: str = "designed") -> Speaker:
    """Draw a speaker's voice; distributions differ by gender as in adult speech.

    ``gender_style`` scales the explicit gender-by-emotion interaction. At 0 a weaker cue remains
    after z-normalisation: a higher F0 changes how an emotion moves the higher MFCCs' dynamics
    (docs/synthetic.md and docs/results.md say how much a linear probe and the paper's attack read of it).
    """
    if gender not in ("F", "M"):
        raise ValueError(f"speaker {speaker_id!r}: gender must be 'F' or 'M', got {gender!r}")
    if not gender_style >= 0:
        raise ValueError(f"gender_style must be >= 0, got {gender_style}")
    check_voice(voice)
    female = gender == "F"
    return Speaker(
        speaker_id=speaker_id,
        gender=gender,
        f0_hz=float(rng.normal(210.0, 22.0) if female else rng.normal(118.0, 14.0)),
        formant_scale=float(rng.normal(1.17, 0.04) if female else rng.normal(1.0, 0.04)),
        jitter=float(rng.uniform(0.004, 0.015)),
        shimmer=float(rng.uniform(0.03, 0.10)),
        breathiness=float(rng.uniform(0.04, 0.14) if female else rng.uniform(0.02, 0.10)),
        expressivity=float(np.clip(rng.lognormal(0.0, 0.25), 0.5, 1.8)),
        tilt=float(rng.normal(0.0, 0.2)),
        gender_style=float(gender_style),
        voice=voice,
    )


def utterance_prosody(speaker: Speaker, emotion: str, intensity: float = 1.0) -> Prosody:
    """Prosody of one utterance: shared effect + the speaker's gender style, scaled."""
    if emotion not in EMOTION_PROSODY:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {sorted(EMOTION_PROSODY)}")
    k = speaker.expressivity * intensity
    v = check_voice(speaker.voice)
    return (v.emotion[emotion] + v.style[speaker.gender][emotion].scaled(speaker.gender_style)).scaled(k)


def _resonator(freq: float, bw: float) -> tuple[np.ndarray, np.ndarray]:
    r = np.exp(-np.pi * bw / SAMPLE_RATE)
    theta = 2 * np.pi * freq / SAMPLE_RATE
    a = np.array([1.0, -2 * r * np.cos(theta), r * r])
    b = np.array([a.sum()])  # unity gain at DC keeps levels comparable across formants
    return b, a


def synthesize(
    speaker: Speaker,
    emotion: str,
    rng: np.random.Generator,
    intensity: float = 1.0,
    min_seconds: float = 1.0,
    max_seconds: float = 2.4,
) -> np.ndarray:
    """Synthesise one utterance (float32 waveform at 16 kHz, peak below 1)."""
    p = utterance_prosody(speaker, emotion, intensity)
    # Per-utterance variability: the same emotion is never said the same way twice.
    f0_st = p.f0_semitones + rng.normal(0.0, 1.6)
    f0_range = p.f0_range * rng.lognormal(0.0, 0.25)
    energy_db = p.energy_db + rng.normal(0.0, 3.0)
    rate = p.rate * rng.lognormal(0.0, 0.1)
    tilt = speaker.tilt + p.tilt + rng.normal(0.0, 0.25)
    breath = np.clip(speaker.breathiness + p.breathiness + rng.normal(0.0, 0.03), 0.0, 0.6)
    fscale = speaker.formant_scale * (1.0 + p.formant_shift + rng.normal(0.0, 0.015))

    target = rng.uniform(min_seconds, max_seconds)
    syll_dur = 0.2 / rate
    n_syll = max(2, int(round(target / (syll_dur * 1.25))))
    f0_mean = speaker.f0_hz * 2.0 ** (f0_st / 12.0)

    # Glottal low-pass: tilt < 0 darkens (more low-pass), tilt > 0 brightens.
    pole = float(np.clip(0.93 - 0.12 * tilt, 0.55, 0.985))
    pieces: list[np.ndarray] = []
    for i in range(n_syll):
        n = int(SAMPLE_RATE * syll_dur * rng.uniform(0.7, 1.4))
        t = np.arange(n) / SAMPLE_RATE
        # Intonation: declination over the utterance + an accent on some syllables.
        pos = i / max(1, n_syll - 1)
        accent = rng.normal(0.0, 1.0) * 2.0 * f0_range
        st = (1.5 - 3.0 * pos) * f0_range + accent * np.sin(np.pi * t / t[-1])
        f0 = f0_mean * 2.0 ** (st / 12.0)
        phase = np.cumsum(f0) / SAMPLE_RATE
        idx = np.flatnonzero(np.diff(np.floor(phase)) > 0)
        period = SAMPLE_RATE / f0[idx]
        idx = np.clip(idx + np.round(rng.normal(0.0, speaker.jitter, idx.size) * period), 0, n - 1)
        src = np.zeros(n)
        np.add.at(src, idx.astype(int), rng.lognormal(0.0, speaker.shimmer, idx.size))
        src = lfilter([1.0 - pole], [1.0, -pole], src)
        src = lfilter([1.0 - pole], [1.0, -pole], src)
        noise = rng.normal(0.0, 1.0, n) * np.std(src)
        excitation = (1.0 - breath) * src + breath * noise
        formants = _VOWELS[rng.integers(len(_VOWELS))] * fscale
        y = excitation
        for f, bw in zip(formants, _BANDWIDTHS * (1.0 + 0.5 * breath)):
            b, a = _resonator(min(f, 0.45 * SAMPLE_RATE), bw)
            y = lfilter(b, a, y)
        y = np.diff(y, prepend=0.0)  # lip radiation
        env = np.minimum(1.0, np.minimum(t / 0.03, (t[-1] - t) / 0.05))
        pieces.append(y * env)
        pause = int(SAMPLE_RATE * rng.uniform(0.02, 0.12) / rate)
        pieces.append(np.zeros(pause))
    wave = np.concatenate(pieces)
    wave /= np.sqrt(np.mean(wave**2)) + 1e-12
    wave *= 0.05 * 10.0 ** (energy_db / 20.0)
    peak_to = check_voice(speaker.voice).peak
    if peak_to is not None:  # a level-normalised recording: the loudest sample sets the level, not the emotion
        wave *= peak_to / (np.max(np.abs(wave)) + 1e-12)
    wave += rng.normal(0.0, 3e-4, wave.size)  # room noise: silence is never digital zero
    peak = np.max(np.abs(wave))
    if peak > 0.98:
        wave *= 0.98 / peak  # clipping would add broadband artefacts
    return wave.astype(np.float32)
