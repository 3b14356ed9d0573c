"""Synthetic 12-lead ECGs written in the original CPSC2018 file format (demo and tests only).

What the signals ARE: simulated electrocardiograms. Every beat is a sum of Gaussian waves
(P, Q, R, S, T and, where a class needs them, ST-segment, notch and R' waves) with
lead-specific amplitudes, partly from a simple dipole model projected on the lead axes.
Rhythm, heart-rate variability, record-to-record amplitude variation, baseline wander,
white, muscle (EMG) and power-line noise are simulated too. Each of the 9 CPSC2018 classes
gets a textbook version of its defining feature: irregular RR and f-waves without P waves
(AF), PR > 0.2 s (I-AVB), wide QRS of the left or right bundle-branch-block shape (LBBB,
RBBB), frequent premature atrial or ventricular beats (PAC, PVC), ST depression or
elevation (STD, STE). The files follow the layout of the original CPSC2018 distribution:
``A0001.mat``, ``A0002.mat``, ... each holding a 1x1 MATLAB struct ``ECG`` with
fields sex, age, data (12 x N double, mV, 500 Hz, leads I, II, III, aVR, aVL, aVF, V1..V6,
quantized to 0.001 mV), and ``REFERENCE.csv`` (labels 1..9, about 5% of the records with
more than one label).

What the signals are NOT: they are not CPSC2018 recordings, not derived from any patient,
and not clinical data. Their morphology is a caricature: a model that does well on them says
nothing about real ECGs. They exist so that a new user can run the whole pipeline without
downloading CPSC2018, and so that tests have data with known properties.

Usage: ``python databases/synthetic.py --out_dir data/demo/train --records_per_class 30 --seed 0
[--max_seconds 10]``. From Python: ``generate_dataset(...)`` writes a dataset;
``synthesize_record(label, n_samples, rng)`` returns one (12, n) signal in mV.
"""
from __future__ import annotations

import io
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io
import scipy.signal
import scipy.stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's modules, when run as a command

from config import PRESETS  # noqa: E402
from databases.cpsc2018 import CLASSES, FS, LABEL_COLUMNS, REFERENCE_FILE  # noqa: E402
from plumbing.flags import ConfigError, OneLineParser, folder  # noqa: E402

NORMAL, AF, IAVB, LBBB, RBBB, PAC, PVC, STD, STE = range(1, 10)  # label k is CLASSES[k - 1]
QUANTA_PER_MV = 1000  # values are multiples of 0.001 mV, the resolution of the real CPSC2018 data
MARKER_NAME = "SYNTHETIC_DATA.txt"  # marks a folder written by this module (safe to regenerate)

# Label pairs that cannot describe one record: AF has no P wave (so no PR interval and no
# premature atrial beat), a bundle branch block is left or right, ST is either depressed or
# elevated. Normal goes with nothing.
_EXCLUSIVE_PAIRS = frozenset(frozenset(pair) for pair in ((AF, IAVB), (AF, PAC), (LBBB, RBBB), (STD, STE)))
_THIRD_LABEL_PROBABILITY = 0.1  # of a multi-label record

# Record lengths: log-normal with CPSC2018's median (about 12 s), most records 6-20 s and a
# thin tail to 60 s, truncated to the requested bounds.
_MEDIAN_SECONDS = 12.0
_LOG_SIGMA = 0.45
_WANDER_STEP = 10  # samples between exact evaluations of the slow baseline wander

# The eight independent leads I, II, V1..V6 (the other four follow from I and II).
_N_INDEPENDENT = 8
_I, _II, _V1, _V2, _V3, _V4, _V5, _V6 = range(_N_INDEPENDENT)
_TWELVE_FROM_INDEPENDENT = np.array([
    [1, 0, 0, 0, 0, 0, 0, 0],  # I
    [0, 1, 0, 0, 0, 0, 0, 0],  # II
    [-1, 1, 0, 0, 0, 0, 0, 0],  # III = II - I
    [-0.5, -0.5, 0, 0, 0, 0, 0, 0],  # aVR = -(I + II) / 2
    [1, -0.5, 0, 0, 0, 0, 0, 0],  # aVL = I - II / 2
    [-0.5, 1, 0, 0, 0, 0, 0, 0],  # aVF = II - I / 2
    *np.eye(_N_INDEPENDENT)[2:],  # V1..V6
])

# Lead axes for the dipole model (x to the patient's left, y inferior, z anterior). The
# precordial electrodes sit close to the heart, hence their larger gain.
_PRECORDIAL_ANGLES = np.deg2rad([120, 95, 75, 60, 35, 0])  # horizontal plane, from the left toward anterior
_LEAD_VECTORS = np.vstack([
    [1.0, 0.0, 0.0],
    [0.5, np.sqrt(3) / 2, 0.0],
    1.3 * np.column_stack([np.cos(_PRECORDIAL_ANGLES), np.full(6, 0.1), np.sin(_PRECORDIAL_ANGLES)]),
])


_Wave = tuple[float, float, np.ndarray]  # (offset s, sigma s, amplitudes in the 8 independent leads mV)


@dataclass(frozen=True)
class _Beat:
    """One beat shape: Gaussian waves at ``offsets`` (s, relative to the beat's time) with
    widths ``sigmas`` (s) and amplitudes ``amps`` (waves x 8 independent leads, mV)."""

    offsets: np.ndarray
    sigmas: np.ndarray
    amps: np.ndarray

    @classmethod
    def of(cls, waves: Iterable[_Wave]) -> _Beat:
        offsets, sigmas, amps = zip(*waves)
        return cls(np.array(offsets, float), np.array(sigmas, float), np.array(amps, float).reshape(-1, _N_INDEPENDENT))


# ----------------------------------------------------------------------------- labels


def _check_labels(label: int | Sequence[int]) -> frozenset[int]:
    """The label set of one record; ValueError for unknown labels or impossible combinations."""
    try:
        values = [float(label)] if np.isscalar(label) else [float(value) for value in label]
    except (TypeError, ValueError):
        values = []
    if not values or any(not value.is_integer() or not 1 <= value <= 9 for value in values):
        raise ValueError(f"labels must be integers 1..9 ({', '.join(CLASSES)}), got {label!r}")
    unique = frozenset(int(value) for value in values)
    if len(unique) != len(values) or not _compatible(unique):
        raise ValueError(f"labels {label!r} cannot describe one record (repeated label or incompatible classes)")
    return unique


def _compatible(labels: frozenset[int]) -> bool:
    if NORMAL in labels:
        return len(labels) == 1
    return not any(pair <= labels for pair in _EXCLUSIVE_PAIRS)


def _extra_label(labels: Sequence[int], rng: np.random.Generator) -> int | None:
    """A random label that can join ``labels``, or None if there is none."""
    choices = [value for value in range(2, 10)
               if value not in labels and _compatible(frozenset(labels) | {value})]
    return int(rng.choice(choices)) if choices else None


# ----------------------------------------------------------------------------- beats


def _frontal(magnitude: float, axis_deg: float) -> np.ndarray:
    """Amplitudes in leads I and II of a frontal-plane vector (axis in degrees, 0 = lead I)."""
    return magnitude * np.cos(np.deg2rad(axis_deg - np.array([0.0, 60.0])))


def _dipole(magnitude: float, direction: np.ndarray) -> np.ndarray:
    """Amplitudes in the 8 independent leads of a 3-D dipole (direction need not be unit)."""
    return magnitude * _LEAD_VECTORS @ (direction / np.linalg.norm(direction))


def _jitter(rng: np.random.Generator, shape: int | tuple[int, ...], spread: float = 0.15) -> np.ndarray:
    """Multiplicative record-to-record variation of wave amplitudes."""
    return rng.lognormal(0.0, spread, shape)


def _ventricular_waves(labels: frozenset[int], rr_mean: float,
                       rng: np.random.Generator) -> tuple[list[_Wave], float, float]:
    """QRS, ST and T waves of a conducted beat; returns (waves, QRS onset s, J point s)."""
    width = rng.uniform(0.9, 1.15) if labels.isdisjoint({LBBB, RBBB}) else rng.uniform(1.0, 1.2)
    if LBBB in labels:
        axis = rng.uniform(-20, 60)
        mag = rng.uniform(0.6, 1.2)
        late_r = np.r_[_frontal(mag, axis), 0.0, 0.0, 0.12, 0.45, 1.0, 1.0]
        early_r = np.r_[0.85 * late_r[:2], 0.06, 0.05, 0.1, 0.35, 0.8, 0.85]
        qs = np.array([0, 0, -1.0, -1.5, -1.2, -0.5, 0, 0])
        qrs = [(-0.025 * width, 0.016 * width, early_r * _jitter(rng, 8)),  # broad notched R (I, V5, V6)
               (0.025 * width, 0.018 * width, late_r * _jitter(rng, 8)),
               (0.004 * width, 0.028 * width, qs * _jitter(rng, 8))]  # deep QS (V1-V3)
        onset, j_point, t_delay = -0.068 * width, 0.07 * width, 0.04
        # secondary repolarization changes are discordant to the QRS
        t_amps = np.r_[-0.3 * _frontal(mag, axis), 0.3, 0.45, 0.35, 0.1, -0.25, -0.3]
        st = 0.25 * t_amps
    elif RBBB in labels:
        axis = rng.uniform(0, 90)
        mag = rng.uniform(0.6, 1.4)
        q = np.array([-0.05, 0, 0, 0, 0, 0, -0.07, -0.06])
        r = np.r_[_frontal(mag, axis), 0.22, 0.35, 0.6, 1.0, 1.1, 0.9]
        s = np.array([-0.1, -0.1, -0.45, -0.7, -0.5, -0.3, -0.1, -0.05])
        terminal = np.array([-0.35, -0.15, 0.7, 0.45, 0.1, -0.2, -0.3, -0.35])  # R' in V1/V2, wide S elsewhere
        qrs = [(-0.03 * width, 0.007 * width, q * _jitter(rng, 8)),
               (-0.015 * width, 0.009 * width, r * _jitter(rng, 8)),
               (0.012 * width, 0.009 * width, s * _jitter(rng, 8)),
               (0.055 * width, 0.02 * width, terminal * _jitter(rng, 8))]
        onset, j_point, t_delay = -0.05 * width, 0.1 * width, 0.03
        t_amps = np.r_[_frontal(rng.uniform(0.15, 0.35), axis + rng.uniform(-25, 25)),
                       -0.2, -0.15, 0.3, 0.35, 0.3, 0.22]
        st = np.zeros(8)
    else:
        axis = rng.uniform(0, 80)
        q = np.array([-0.05, -0.06, 0, 0, 0, -0.03, -0.08, -0.07])
        r = np.r_[_frontal(rng.uniform(0.8, 1.6), axis), 0.25, 0.5, 0.8, 1.2, 1.4, 1.1]
        s = np.array([-0.12, -0.2, -0.9, -1.3, -0.9, -0.5, -0.25, -0.1])
        qrs = [(-0.022 * width, 0.007 * width, q * _jitter(rng, 8)),
               (0.0, 0.009 * width, r * _jitter(rng, 8)),
               (0.024 * width, 0.008 * width, s * _jitter(rng, 8))]
        onset, j_point, t_delay = -0.04 * width, 0.045 * width, 0.0
        t_amps = np.r_[_frontal(rng.uniform(0.2, 0.4), axis + rng.uniform(-25, 25)),
                       rng.uniform(-0.1, 0.15), 0.35, 0.45, 0.4, 0.3, 0.22]
        st = rng.normal(0.0, 0.015, 8)
    t_amps = t_amps * _jitter(rng, 8)
    st = st + _st_shift(labels, t_amps, rng)
    t_center = rng.uniform(0.26, 0.30) * np.sqrt(rr_mean) + t_delay
    t_sigma = rng.uniform(0.045, 0.06)
    waves = qrs + [
        # two overlapping Gaussians make a flat ST segment from the J point into the T wave
        (j_point + 0.03, 0.03, st / 1.2), (j_point + 0.09, 0.035, st / 1.2),
        (t_center, t_sigma, t_amps), (t_center + 0.05, 0.035, 0.3 * t_amps),  # asymmetric T
    ]
    return waves, onset, j_point


def _st_shift(labels: frozenset[int], t_amps: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """ST deviation (mV) per independent lead for STD/STE; flattens or peaks T in place."""
    shift = np.zeros(8)
    if STD in labels:
        leads = rng.choice([_I, _II, _V3, _V4, _V5, _V6], size=rng.integers(3, 7), replace=False)
        shift[leads] = -rng.uniform(0.1, 0.3, leads.size)
        t_amps[leads] *= rng.uniform(-0.3, 0.7, leads.size)  # flat or inverted T
    if STE in labels:
        territory = rng.integers(4)
        leads = ([_II], [_V1, _V2, _V3, _V4], [_I, _V5, _V6], [_I, _V3, _V4, _V5, _V6])[territory]
        shift[leads] = rng.uniform(0.1, 0.3, len(leads))
        if territory == 0:  # inferior: III and aVF up with II; I at or below zero (reciprocal)
            shift[_I] = -rng.uniform(0.0, 0.4) * shift[_II]
        t_amps[leads] = (np.abs(t_amps[leads]) + 0.1) * rng.uniform(1.2, 1.8, len(leads))  # hyperacute T
    return shift


def _p_wave(magnitude: float, direction: np.ndarray, qrs_onset: float, pr: float, sigma: float) -> _Wave:
    """A P wave whose onset (2.5 sigma before its peak) lies ``pr`` before the QRS onset."""
    return qrs_onset - pr + 2.5 * sigma, sigma, _dipole(magnitude, direction)


def _beat_shapes(labels: frozenset[int], rr_mean: float, rng: np.random.Generator) -> list[_Beat]:
    """The record's beat shapes, indexed by beat kind: 0 conducted (sinus or AF), 1 PAC, 2 PVC."""
    ventricular, onset, _ = _ventricular_waves(labels, rr_mean, rng)
    p_axis = np.deg2rad(rng.uniform(30, 75))
    sinus_p_direction = np.array([np.cos(p_axis), np.sin(p_axis), rng.uniform(-0.2, 0.3)])
    pr = rng.uniform(0.28, 0.40) if IAVB in labels else rng.uniform(0.12, 0.20)
    p_sigma = rng.uniform(0.018, 0.024)
    sinus_p = [] if AF in labels else [_p_wave(rng.uniform(0.1, 0.18), sinus_p_direction, onset, pr, p_sigma)]
    conducted = _Beat.of(sinus_p + ventricular)

    # PAC: an ectopic atrial focus gives a P wave pointing at least 100 degrees away from the sinus P
    ectopic_axis = p_axis + np.deg2rad(rng.uniform(100, 260))
    ectopic_direction = np.array([np.cos(ectopic_axis), np.sin(ectopic_axis), rng.uniform(-0.5, 0.5)])
    pac_pr = 0.8 * pr if IAVB in labels else rng.uniform(0.10, 0.16)
    pac = _Beat.of([_p_wave(rng.uniform(0.08, 0.16), ectopic_direction, onset, pac_pr, rng.uniform(0.016, 0.024))]
                   + ventricular)

    # PVC: no P; a wide bizarre QRS from a random ventricular focus, discordant large T
    main = _dipole(rng.uniform(1.0, 1.8), rng.normal(size=3))
    late = _dipole(rng.uniform(0.4, 0.9), rng.normal(size=3))
    pvc_t = rng.uniform(0.3, 0.32) * np.sqrt(rr_mean) + 0.06
    pvc = _Beat.of([(0.0, rng.uniform(0.026, 0.034), main), (0.05, 0.022, late),
                    (pvc_t, 0.07, -rng.uniform(0.25, 0.4) * main)])
    return [conducted, pac, pvc]


# ----------------------------------------------------------------------------- rhythm


def _heart_rate_range(labels: frozenset[int]) -> tuple[float, float]:
    if AF in labels:
        return 70.0, 130.0  # mean ventricular rate
    if IAVB in labels:
        return 50.0, 80.0
    if labels == {NORMAL}:
        return 60.0, 100.0
    return 55.0, 100.0


def _beat_schedule(labels: frozenset[int], rr_mean: float, duration: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Beat times (s) covering [-1 s, duration + 1 s] and their kinds (0 conducted, 1 PAC, 2 PVC)."""
    n_beats = int((duration + 3.0) / (0.4 * rr_mean)) + 4  # more than the shortest intervals need
    index = np.arange(n_beats)
    if AF in labels:  # irregularly irregular: independent gamma intervals
        cv = rng.uniform(0.15, 0.35)
        rr = np.maximum(rng.gamma(1 / cv**2, rr_mean * cv**2, n_beats), 0.3)
    else:  # sinus: respiratory sinus arrhythmia plus a little randomness
        rsa = rng.uniform(0.01, 0.05) * np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * rr_mean * index
                                               + rng.uniform(0, 2 * np.pi))
        rr = rr_mean * (1.0 + rsa + rng.normal(0.0, 0.01, n_beats))
    kinds = np.zeros(n_beats, dtype=np.int64)
    ectopic_kinds = [kind for kind, label in ((1, PAC), (2, PVC)) if label in labels]
    if ectopic_kinds:  # one ectopic beat every 2 + Poisson(lambda) beats: 2.5-4 on average
        gaps = 2 + rng.poisson(rng.uniform(0.5, 2.0), n_beats)
        positions = np.cumsum(gaps) - rng.integers(0, 2)
        positions = positions[positions < n_beats - 1]
        kinds[positions] = rng.choice(ectopic_kinds, positions.size)
        is_pvc = kinds[positions] == 2
        coupling = np.where(is_pvc, rng.uniform(0.45, 0.65), rng.uniform(0.55, 0.75)) \
            * rng.uniform(0.97, 1.03, positions.size)
        following = np.where(is_pvc, 2.0 - coupling,  # PVC: full compensatory pause
                             rng.uniform(1.0, 1.12, positions.size))  # PAC: the sinus node is reset
        rr[positions + 1] = rr[positions] * following
        rr[positions] *= coupling
    times = -1.0 - rng.uniform(0.0, rr_mean) + np.cumsum(rr)
    keep = times <= duration + 1.0
    return times[keep], kinds[keep]


# ----------------------------------------------------------------------------- rendering


def _render(times: np.ndarray, kinds: np.ndarray, shapes: list[_Beat], beat_gains: np.ndarray,
            n_samples: int) -> np.ndarray:
    """The (8, n_samples) heart signal: each beat kind's waveform is drawn once and placed at its
    beats (to the nearest sample) by convolving it with a train of impulses weighted by the beat gains."""
    half = max(int(np.ceil(np.max(np.abs(shape.offsets) + 4.5 * shape.sigmas) * FS)) for shape in shapes)
    lags = np.arange(-half, half + 1) / FS
    # impulse positions in a buffer starting `half` samples before the record, so that beats
    # just outside it still contribute their P or T waves
    positions = np.rint(times * FS).astype(np.int64) + half
    inside = (positions >= 0) & (positions < n_samples + 2 * half)
    signal = np.zeros((_N_INDEPENDENT, n_samples + 4 * half))
    for kind, shape in enumerate(shapes):
        chosen = inside & (kinds == kind)
        if chosen.any():
            impulses = np.zeros((1, n_samples + 2 * half))
            impulses[0, positions[chosen]] = beat_gains[chosen]
            waveform = shape.amps.T @ np.exp(-0.5 * ((lags - shape.offsets[:, None]) / shape.sigmas[:, None]) ** 2)
            signal += scipy.signal.fftconvolve(impulses, waveform, axes=1)
    return signal[:, 2 * half:2 * half + n_samples]


def _fibrillatory_waves(n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """AF f-waves: 4-9 Hz, amplitude-modulated, largest in V1 and II; (8, n) mV."""
    t = np.arange(n_samples) / FS
    base = rng.uniform(4.5, 8.0)
    freqs = base * rng.uniform(0.85, 1.15, (3, 1))
    envelope = 1.0 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5, (3, 1)) * t + rng.uniform(0, 2 * np.pi, (3, 1)))
    lead_weights = np.array([0.3, 0.6, 1.0, 0.6, 0.4, 0.3, 0.25, 0.2])
    lead_phase = rng.uniform(0, 2 * np.pi, (_N_INDEPENDENT, 1, 1))
    components = envelope * np.sin(2 * np.pi * freqs * t + rng.uniform(0, 2 * np.pi, (3, 1)) + lead_phase)
    return rng.uniform(0.05, 0.13) * lead_weights[:, None] * components.mean(axis=1)  # V1: 0.03-0.07 mV RMS


def _nuisances(n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Baseline wander, white noise and, in some records, EMG bursts and 50 Hz hum; (8, n) mV."""
    t = np.arange(n_samples) / FS
    # wander (three sinusoids < 0.35 Hz per lead) is smooth: evaluate it every 10 samples and interpolate
    coarse = t[::_WANDER_STEP] if n_samples % _WANDER_STEP == 1 else np.r_[t[::_WANDER_STEP], t[-1]]
    shape = (_N_INDEPENDENT, 3, 1)
    components = np.sin(2 * np.pi * rng.uniform(0.05, 0.35, shape) * coarse + rng.uniform(0, 2 * np.pi, shape))
    wander = rng.uniform(0.02, 0.2) * (rng.uniform(0.2, 0.6, shape) * components).sum(axis=1)
    noise = np.stack([np.interp(t, coarse, lead) for lead in wander]) \
        + rng.uniform(0.003, 0.012) * rng.standard_normal((_N_INDEPENDENT, n_samples))
    if rng.random() < 0.3:  # muscle noise: differenced white noise (high-pass), in slow bursts
        burst = np.clip(np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi)), 0, None) ** 2
        white = rng.standard_normal((_N_INDEPENDENT, n_samples + 1))
        noise += rng.uniform(0.01, 0.04) * burst * np.diff(white, axis=1) / np.sqrt(2)
    if rng.random() < 0.15:
        phases = rng.uniform(0, 2 * np.pi, (_N_INDEPENDENT, 1))
        noise += rng.uniform(0.005, 0.02) * np.sin(2 * np.pi * 50.0 * t + phases)
    return noise


def synthesize_record(label: int | Sequence[int], n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic 12-lead ECG (leads as in cpsc2018.LEAD_NAMES, 500 Hz, mV, quantized to 0.001 mV).

    ``label`` is a class 1..9 or a sequence of compatible classes (a multi-label record,
    e.g. (AF, RBBB)). III, aVR, aVL and aVF are computed from I and II as in a real
    recorder, so the limb-lead identities hold to the quantization. Returns (12, n_samples)
    float64. Raises ValueError for an unknown label, incompatible labels or n_samples < 1.
    """
    labels = _check_labels(label)
    if not _is_positive_integer(n_samples):
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    n_samples = int(n_samples)
    duration = n_samples / FS
    rr_mean = 60.0 / rng.uniform(*_heart_rate_range(labels))
    times, kinds = _beat_schedule(labels, rr_mean, duration, rng)
    shapes = _beat_shapes(labels, rr_mean, rng)
    breathing = np.sin(2 * np.pi * rng.uniform(0.15, 0.35) * times + rng.uniform(0, 2 * np.pi))
    beat_gains = 1.0 + rng.uniform(0.02, 0.06) * breathing + rng.normal(0.0, 0.02, times.size)
    heart = _render(times, kinds, shapes, beat_gains, n_samples)
    if AF in labels:
        heart += _fibrillatory_waves(n_samples, rng)
    lead_gains = rng.lognormal(0.0, 0.2) * rng.lognormal(0.0, 0.12, (_N_INDEPENDENT, 1))
    independent = _quantize(lead_gains * heart + _nuisances(n_samples, rng))
    return _quantize(_TWELVE_FROM_INDEPENDENT @ independent)


def _is_positive_integer(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _quantize(signal: np.ndarray) -> np.ndarray:
    """Round to the nearest multiple of 0.001 mV (the closest double to k / 1000)."""
    return np.rint(signal * QUANTA_PER_MV) / QUANTA_PER_MV


# ----------------------------------------------------------------------------- dataset


def _check_settings(records_per_class: int, seed: int, min_seconds: float, max_seconds: float,
                    multilabel_fraction: float) -> None:
    if not _is_positive_integer(records_per_class):
        raise ValueError(f"records_per_class must be a positive integer, got {records_per_class!r}")
    if not (_is_positive_integer(seed) or seed == 0):
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not 1.0 <= min_seconds <= max_seconds:
        raise ValueError(f"need 1 <= min_seconds <= max_seconds, got min_seconds={min_seconds}, "
                         f"max_seconds={max_seconds}")
    if not 0.0 <= multilabel_fraction <= 0.5:
        raise ValueError(f"multilabel_fraction must lie in [0, 0.5], got {multilabel_fraction}")


def _record_lengths(count: int, min_seconds: float, max_seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Lengths in samples: CPSC2018-like log-normal seconds, truncated to [min_seconds, max_seconds]."""
    low, high = (np.log(np.array([min_seconds, max_seconds]) / _MEDIAN_SECONDS)) / _LOG_SIGMA
    seconds = _MEDIAN_SECONDS * np.exp(_LOG_SIGMA * scipy.stats.truncnorm.rvs(low, high, size=count, random_state=rng))
    return np.clip(np.rint(seconds * FS), np.ceil(min_seconds * FS), np.floor(max_seconds * FS)).astype(np.int64)


def _reference_table(records_per_class: int, multilabel_fraction: float, rng: np.random.Generator) -> pd.DataFrame:
    """REFERENCE.csv rows: records_per_class first labels per class in random order, some with extra labels."""
    first = rng.permutation(np.repeat(np.arange(1, 10), records_per_class))
    total = first.size
    label_sets = [[int(value)] for value in first]
    candidates = np.nonzero(first != NORMAL)[0]
    for row in rng.choice(candidates, int(round(multilabel_fraction * total)), replace=False):
        label_sets[row].append(_extra_label(label_sets[row], rng))
        if rng.random() < _THIRD_LABEL_PROBABILITY and (third := _extra_label(label_sets[row], rng)) is not None:
            label_sets[row].append(third)
    width = max(4, len(str(total)))
    table = pd.DataFrame({"Recording": [f"A{index:0{width}d}" for index in range(1, total + 1)]})
    for position, column in enumerate(LABEL_COLUMNS):
        table[column] = pd.array([labels[position] if len(labels) > position else None for labels in label_sets],
                                 dtype="Int64")
    return table


def _prepare_out_dir(out_dir: Path, marker_text: str) -> None:
    """Create out_dir and mark it as synthetic, clearing a dataset this module wrote there
    before (so that no stale record survives); refuse a folder holding other ECG data."""
    out_dir.mkdir(parents=True, exist_ok=True)
    marker = out_dir / MARKER_NAME
    dataset_files = [*out_dir.glob("*.mat"), *out_dir.glob("*.hea"), *out_dir.glob(REFERENCE_FILE)]
    if dataset_files and not marker.exists():
        raise FileExistsError(f"{out_dir}: holds ECG files not written by synthetic.py (e.g. {dataset_files[0].name}); "
                              "choose an empty or new --out_dir")
    marker.write_text(marker_text)  # first, so that an interrupted run still leaves a folder marked as ours
    for path in dataset_files:
        path.unlink()


_MAT_HEADER_BYTES = 128
_MI_COMPRESSED = 15  # MAT-file v5 data type of a zlib-compressed data element


def _save_record(path: Path, data: np.ndarray, sex: str, age: float) -> None:
    """Write one record as the original CPSC2018 .mat: a 1x1 struct ECG {sex, age, data}.

    scipy.io.savemat encodes the file; its element is then zlib-compressed at level 1
    instead of savemat's fixed level 6 (do_compression=True): the same MAT-5 file structure,
    somewhat larger and much faster to write, since at level 6 writing takes several times
    longer than synthesizing the record (benchmarks/README.md, "Synthetic records").
    """
    ecg = np.empty((1, 1), dtype=[("sex", object), ("age", object), ("data", object)])
    ecg[0, 0] = (sex, float(age), data)
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, {"ECG": ecg}, format="5", do_compression=False)
    encoded = buffer.getvalue()
    header, element = encoded[:_MAT_HEADER_BYTES], encoded[_MAT_HEADER_BYTES:]
    byte_order = "<" if header[-2:] == b"IM" else ">"  # the header's endian indicator
    compressed = zlib.compress(element, 1)
    path.write_bytes(header + struct.pack(f"{byte_order}II", _MI_COMPRESSED, len(compressed)) + compressed)


def generate_dataset(out_dir: str | Path, records_per_class: int = 30, seed: int = 0, min_seconds: float = 6.0,
                     max_seconds: float = 60.0, multilabel_fraction: float = 0.05) -> pd.DataFrame:
    """Write a synthetic dataset in the original CPSC2018 format to ``out_dir``.

    records_per_class records per First_label (9 classes) in shuffled order, named A0001...,
    lengths between min_seconds and max_seconds (CPSC2018-like distribution), and
    round(multilabel_fraction * total) records carrying a second (rarely a third) compatible
    label. Writes the .mat files, REFERENCE.csv and a SYNTHETIC_DATA.txt marker; the same
    seed gives the same files. A folder this function wrote before is regenerated in place;
    a folder holding other ECG files raises FileExistsError. Returns the REFERENCE table
    (Recording str, labels as pandas "Int64").
    """
    _check_settings(records_per_class, seed, min_seconds, max_seconds, multilabel_fraction)
    out_dir = Path(out_dir)
    table_seed, *record_seeds = np.random.SeedSequence(seed).spawn(9 * int(records_per_class) + 1)
    table_rng = np.random.default_rng(table_seed)
    table = _reference_table(int(records_per_class), multilabel_fraction, table_rng)
    lengths = _record_lengths(len(table), min_seconds, max_seconds, table_rng)
    sexes = np.where(table_rng.random(len(table)) < 0.54, "Male", "Female")
    ages = np.clip(np.rint(table_rng.normal(58.0, 18.0, len(table))), 18, 95)
    _prepare_out_dir(out_dir, "SYNTHETIC ECG DATA: simulated by synthetic.py for the demo and the tests.\n"
                     "These are NOT CPSC2018 recordings and NOT clinical data; results on them say nothing about "
                     "real ECGs.\n"
                     f"settings: records_per_class={records_per_class} seed={seed} min_seconds={min_seconds} "
                     f"max_seconds={max_seconds} multilabel_fraction={multilabel_fraction}\n")
    label_columns = table[list(LABEL_COLUMNS)].to_numpy()
    for row, record_seed in enumerate(record_seeds):
        labels = [int(value) for value in label_columns[row] if not pd.isna(value)]
        data = synthesize_record(labels, int(lengths[row]), np.random.default_rng(record_seed))
        _save_record(out_dir / f"{table.Recording[row]}.mat", data, str(sexes[row]), float(ages[row]))
    table.to_csv(out_dir / REFERENCE_FILE, index=False)
    return table


# ----------------------------------------------------------------------------- CLI


def _summary(table: pd.DataFrame, out_dir: Path, seconds: float) -> str:
    counts = table["First_label"].value_counts()
    size = sum(path.stat().st_size for path in out_dir.iterdir() if path.is_file())
    multi = int(table["Second_label"].notna().sum())
    lines = [f"wrote {len(table)} SYNTHETIC records to {out_dir} in {seconds:.1f} s "
             "(simulated signals for the demo and tests: not CPSC2018, not clinical data)",
             "First_label counts:"]
    lines += [f"  {label} {name:<7}{counts.get(label, 0):>6}" for label, name in enumerate(CLASSES, start=1)]
    lines += [f"  total    {len(table):>6} ({multi} with more than one label)",
              f"size on disk: {size / 1e6:.1f} MB"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = OneLineParser(
        description="Write a SYNTHETIC 12-lead ECG dataset in the original CPSC2018 format (A0001.mat ... + "
                    "REFERENCE.csv). The signals are simulated for the demo and tests; they are not CPSC2018 "
                    "recordings and not clinical data.")
    # The default: the demo's records (reproduce.py --preset demo).
    parser.add_flag("--out_dir", type=folder, default=PRESETS["demo"].raw_dir,
                    help="output folder (default: %(default)s)")
    parser.add_flag("--records_per_class", type=int, default=30, help="records per First_label (default: 30)")
    parser.add_flag("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_flag("--min_seconds", type=float, default=6.0, help="shortest record in s (default: 6)")
    parser.add_flag("--max_seconds", type=float, default=60.0,
                    help="longest record in s (default: 60, like CPSC2018; smaller keeps the files small)")
    parser.add_flag("--multilabel_fraction", type=float, default=0.05,
                    help="fraction of records with more than one label (default: 0.05)")
    start = time.perf_counter()
    try:
        args = parser.parse_args(argv)
        _check_settings(args.records_per_class, args.seed, args.min_seconds, args.max_seconds,
                        args.multilabel_fraction)
    except (ConfigError, ValueError) as error:  # a bad flag
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        table = generate_dataset(args.out_dir, args.records_per_class, args.seed, args.min_seconds,
                                 args.max_seconds, args.multilabel_fraction)
    except FileExistsError as error:  # --out_dir holds files of its own: refused before writing
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a record or REFERENCE.csv that could not be written
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(_summary(table, Path(args.out_dir), time.perf_counter() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
