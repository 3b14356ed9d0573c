"""Tests for noises.py: the paper's white noise (its range, distribution and clipping) and the
real-ECG noises (the signal-to-noise ratio reached, the mask, the spectrum of each noise, the
argument checks)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from perturbations import noises
from databases.cpsc2018 import FS
from helpers import generator, right_aligned_masks


# ----------------------------------------------------------------------------- white noise

def test_white_noise_zero_budget_returns_input_and_negative_budget_raises():
    x = 0.5 * torch.ones(2, 3, 64)
    out = noises.white_noise(x, 0.0)
    assert torch.equal(out, x) and out is not x
    with pytest.raises(ValueError, match="eps"):
        noises.white_noise(x, -0.1)


def test_white_noise_is_uniform_on_every_element_and_clipped():
    x = torch.zeros(4, 8, 4096)
    x[0] = 0.98  # near the top: the clip must act
    noisy = noises.white_noise(x, 0.1, generator=generator())
    noise = (noisy - x)[1:]  # the unclipped samples, padding included by design
    assert noise.abs().max() <= 0.1 and noise.abs().max() > 0.0999
    assert abs(noise.mean().item()) < 1e-3
    assert noise.var().item() == pytest.approx(0.1 ** 2 / 3, rel=0.02)  # variance of U(-e, e)
    assert noisy.max() <= 1 and (noisy[0] == 1).any()


# ----------------------------------------------------------------------------- real-ECG noises

def ecg_like(lengths: list[int], total: int = 5120) -> tuple[torch.Tensor, torch.Tensor]:
    """Small-amplitude periodic 'beats' (|x| <= 0.4, so noise at 10 dB is never clipped)."""
    t = torch.arange(total) / FS
    beats = 0.3 * torch.exp(-((t % 0.8 - 0.4) ** 2) / 2e-4) + 0.05 * torch.sin(2 * math.pi * t)
    scale = torch.tensor([1.0, -0.6, 0.8])[None, :, None]
    mask = right_aligned_masks(lengths, total)
    return beats * scale * mask, mask


def spectrum(noise: torch.Tensor, mask: torch.Tensor, record: int, lead: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Frequencies and power of one record/lead's noise over its signal samples (numpy)."""
    segment = noise[record, lead][mask[record, 0].bool()].double().numpy()
    return np.fft.rfftfreq(len(segment), 1 / FS), np.abs(np.fft.rfft(segment)) ** 2


SNR_NOISES = {
    "baseline_wander": noises.baseline_wander,
    "powerline_50": noises.powerline,
    "powerline_60": lambda x, mask, snr, generator=None: noises.powerline(
        x, mask, snr, freq=60.0, generator=generator),
    "muscle_noise": noises.muscle_noise,
}


@pytest.mark.parametrize("name", SNR_NOISES)
@pytest.mark.parametrize("snr_db", [6.0, 20.0])
def test_noise_snr_matches_request_and_stays_in_mask(name, snr_db):
    x, mask = ecg_like([5120, 4000, 2600])
    x[1, 2] = 0.0  # an all-zero lead gets no noise (no signal to scale to)
    noisy = SNR_NOISES[name](x, mask, snr_db, generator=generator())
    noise = noisy - x
    assert noisy.abs().max() < 1, "clipped: the SNR check would be off"
    assert torch.equal(noise * (1 - mask), torch.zeros_like(noise))
    assert torch.equal(noise[1, 2], torch.zeros(5120))
    signal_power = (x.double() ** 2 * mask).sum(dim=2)
    noise_power = (noise.double() ** 2 * mask).sum(dim=2)
    achieved = 10 * torch.log10(signal_power / noise_power)
    achieved[1, 2] = snr_db  # the zero lead
    torch.testing.assert_close(achieved, torch.full_like(achieved, snr_db), rtol=0, atol=0.5)


@pytest.mark.parametrize("name", SNR_NOISES)
def test_noises_are_reproducible_with_a_generator(name):
    x, mask = ecg_like([5120, 4000])
    same = SNR_NOISES[name](x, mask, 10.0, generator=generator(1))
    assert torch.equal(same, SNR_NOISES[name](x, mask, 10.0, generator=generator(1)))
    assert not torch.equal(same, SNR_NOISES[name](x, mask, 10.0, generator=generator(2)))


def test_baseline_wander_is_below_one_hertz():
    x, mask = ecg_like([5120, 4000])
    noise = noises.baseline_wander(x, mask, 10.0, generator=generator()) - x
    for record in range(2):
        for lead in range(3):
            freqs, power = spectrum(noise, mask, record, lead)
            assert power[freqs < 1.0].sum() / power.sum() > 0.95


@pytest.mark.parametrize("freq", [50.0, 60.0])
def test_powerline_peaks_at_mains_frequency_with_small_harmonic(freq):
    x, mask = ecg_like([5120, 4000])
    noise = noises.powerline(x, mask, 10.0, freq=freq, generator=generator()) - x
    for record in range(2):
        freqs, power = spectrum(noise, mask, record, 0)
        resolution = freqs[1]
        assert abs(freqs[power.argmax()] - freq) <= resolution
        near = lambda f: power[np.abs(freqs - f) <= 1.0].sum()
        fundamental, harmonic = near(freq), near(3 * freq)
        assert fundamental / power.sum() > 0.9
        assert harmonic / fundamental == pytest.approx(0.1 ** 2, rel=0.3)


def test_muscle_noise_is_broadband_between_20_and_150_hz():
    x, mask = ecg_like([5120, 4000])
    noise = noises.muscle_noise(x, mask, 10.0, generator=generator()) - x
    for record in range(2):
        freqs, power = spectrum(noise, mask, record, 1)
        band = (freqs >= 20) & (freqs <= 150)
        assert power[band].sum() / power.sum() > 0.95
        # broadband: the lower and upper halves of the band carry comparable power
        low_half = power[(freqs >= 20) & (freqs < 85)].sum()
        high_half = power[(freqs >= 85) & (freqs <= 150)].sum()
        assert 0.7 < low_half / high_half < 1.4


def test_noise_arguments_are_checked():
    x, mask = ecg_like([5120])
    with pytest.raises(ValueError, match="freq"):
        noises.powerline(x, mask, 10.0, freq=300.0)
    with pytest.raises(ValueError, match="snr_db"):
        noises.muscle_noise(x, mask, float("nan"))
    with pytest.raises(ValueError, match="fs"):
        noises.baseline_wander(x, mask, 10.0, fs=0)
    with pytest.raises(ValueError, match="mask"):
        noises.powerline(x, mask[:, :, :100], 10.0)
