"""Random noises added to a batch of ECG inputs: the paper's white noise (PROTOCOL section 6) and
the noises that real ECGs carry, beyond the paper (PROTOCOL section 10).

Inputs follow the batch convention of ``attacks``: x (B, leads, T) with values in [-1, 1]
(each lead scaled by its largest absolute value) and mask (B, 1, T) with 1 on signal
samples and 0 on padding. Units: ``eps`` is an amplitude in x's units; ``snr_db`` is a
signal-to-noise power ratio in decibels over the mask's samples, per record and lead;
``fs`` and frequencies are in Hz (``fs`` defaults to the dataset's 500 Hz). Randomness comes
from an optional ``torch.Generator`` (the global generator when None); the results are
clipped to [-1, 1].

- ``white_noise``: the paper's uniform noise on every element.
- ``baseline_wander``, ``powerline``, ``muscle_noise``: real-ECG noises, added inside the
  mask at a requested signal-to-noise ratio.
"""
from __future__ import annotations

import math

import torch

from attacks import check_batch, check_eps
from databases.cpsc2018 import FS

BASELINE_COMPONENTS = 3  # low-frequency sinusoids summed per record and lead
BASELINE_BAND_HZ = (0.05, 0.5)  # respiration and electrode drift
POWERLINE_HARMONIC = 3  # mains distortion is dominated by odd harmonics
POWERLINE_HARMONIC_RATIO = 0.1  # amplitude of the harmonic relative to the fundamental
MUSCLE_BAND_HZ = (20.0, 150.0)  # bulk of surface EMG energy seen in ECG recordings


def white_noise(x: torch.Tensor, eps: float, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """x + eps * U(-1, 1) on every element (padding included), clipped to [-1, 1]."""
    eps = check_eps(eps)
    x = x.detach()
    if eps == 0:
        return x.clone()
    noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + eps * (2 * noise - 1)).clamp_(-1, 1)


def _add_at_snr(x: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, snr_db: float
                ) -> torch.Tensor:
    """Add ``noise`` inside the mask, scaled per record and lead to ``snr_db`` over the signal.

    SNR = 10 log10(mean x^2 / mean n^2), both means over the mask's samples; an all-zero
    lead (or an empty mask) gets no noise. The result is clipped to [-1, 1].
    """
    noise = noise * mask
    signal_power = (x * x * mask).sum(dim=2, keepdim=True)
    noise_power = (noise * noise).sum(dim=2, keepdim=True)  # same mask count cancels
    scale = torch.sqrt(signal_power / (noise_power * 10 ** (snr_db / 10)))
    scale = torch.where(noise_power > 0, scale, torch.zeros_like(scale))
    return (x + scale * noise).clamp_(-1, 1)


def _check_noise_args(x: torch.Tensor, mask: torch.Tensor, snr_db: float, fs: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be a finite number of decibels, got {snr_db}")
    if not (math.isfinite(fs) and fs > 0):
        raise ValueError(f"fs must be a positive sampling rate in Hz, got {fs}")
    x = x.detach()
    return x, check_batch(x, mask)


def _uniform(shape: tuple[int, ...], low: float, high: float, x: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    """U(low, high) draws in float64 on x's device (float64 keeps long phases accurate)."""
    draw = torch.rand(shape, generator=generator, device=x.device, dtype=torch.float64)
    return low + (high - low) * draw


def _sinusoids(x: torch.Tensor, freqs: torch.Tensor, amplitudes: torch.Tensor,
               phases: torch.Tensor, fs: float) -> torch.Tensor:
    """Sum over the last axis of a * sin(2 pi f t + phi); all (B, leads, K); returns x's shape."""
    seconds = torch.arange(x.shape[2], device=x.device, dtype=torch.float64) / fs
    wave = torch.zeros(x.shape, device=x.device, dtype=torch.float64)
    for k in range(freqs.shape[2]):  # a few components, each vectorized over batch and leads
        wave += amplitudes[..., k:k + 1] * torch.sin(
            2 * math.pi * freqs[..., k:k + 1] * seconds + phases[..., k:k + 1])
    return wave.to(x.dtype)


def baseline_wander(x: torch.Tensor, mask: torch.Tensor, snr_db: float, fs: float = FS,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Baseline wander: a sum of three sinusoids of 0.05-0.5 Hz, random amplitude and phase
    per record and lead, added inside the mask at ``snr_db`` and clipped to [-1, 1]."""
    x, mask = _check_noise_args(x, mask, snr_db, fs)
    shape = (x.shape[0], x.shape[1], BASELINE_COMPONENTS)
    freqs = _uniform(shape, *BASELINE_BAND_HZ, x, generator)
    amplitudes = _uniform(shape, 0.5, 1.0, x, generator)
    phases = _uniform(shape, 0.0, 2 * math.pi, x, generator)
    return _add_at_snr(x, mask, _sinusoids(x, freqs, amplitudes, phases, fs), snr_db)


def powerline(x: torch.Tensor, mask: torch.Tensor, snr_db: float, fs: float = FS,
              freq: float = 50.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Powerline interference: a ``freq`` Hz sinusoid plus its 3rd harmonic at 10 % amplitude
    (left out when above the Nyquist frequency), random phases per record and lead, added
    inside the mask at ``snr_db`` and clipped to [-1, 1]."""
    x, mask = _check_noise_args(x, mask, snr_db, fs)
    if not (math.isfinite(freq) and 0 < freq < fs / 2):
        raise ValueError(f"powerline freq must lie in (0, fs/2) = (0, {fs / 2}) Hz, got {freq}")
    harmonics = [(1.0, 1.0)]
    if POWERLINE_HARMONIC * freq < fs / 2:
        harmonics.append((float(POWERLINE_HARMONIC), POWERLINE_HARMONIC_RATIO))
    shape = (x.shape[0], x.shape[1], len(harmonics))
    freqs = torch.tensor([freq * h for h, _ in harmonics], device=x.device,
                         dtype=torch.float64).expand(shape)
    amplitudes = torch.tensor([a for _, a in harmonics], device=x.device,
                              dtype=torch.float64).expand(shape)
    phases = _uniform(shape, 0.0, 2 * math.pi, x, generator)
    return _add_at_snr(x, mask, _sinusoids(x, freqs, amplitudes, phases, fs), snr_db)


def muscle_noise(x: torch.Tensor, mask: torch.Tensor, snr_db: float, fs: float = FS,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Muscle (EMG) noise: Gaussian noise band-limited to 20-150 Hz (upper edge capped at
    the Nyquist frequency) by an FFT brick-wall filter, added inside the mask at ``snr_db``
    and clipped to [-1, 1]."""
    x, mask = _check_noise_args(x, mask, snr_db, fs)
    low, high = MUSCLE_BAND_HZ[0], min(MUSCLE_BAND_HZ[1], fs / 2)
    if low >= high:
        raise ValueError(f"fs = {fs} Hz is too low for muscle noise in {MUSCLE_BAND_HZ} Hz")
    gaussian = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    spectrum = torch.fft.rfft(gaussian, dim=2)
    freqs = torch.fft.rfftfreq(x.shape[2], d=1 / fs, device=x.device)
    spectrum = spectrum * ((freqs >= low) & (freqs <= high)).to(spectrum.dtype)
    return _add_at_snr(x, mask, torch.fft.irfft(spectrum, n=x.shape[2], dim=2), snr_db)
