"""Tests for attacks.py: budgets and masks, early stop, closed forms on linear models,
strength against white noise and torchattacks, and the real-ECG noises."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from ECG_CNN import build_model

FS = 500


# ----------------------------------------------------------------------------- helpers

class LinearModel(nn.Module):
    """logits_k = <W_k, x * mask> + b_k: every attack quantity has a closed form."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (classes, leads, T)
        self.bias = nn.Parameter(torch.zeros(weight.shape[0]) if bias is None else bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bct,kct->bk", x * mask, self.weight) + self.bias


class TinyCNN(nn.Module):
    """Two convolutions, masked mean pooling over time, a linear classifier."""

    def __init__(self, leads: int = 2, classes: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv1d(leads, width, 9, padding=4)
        self.conv2 = nn.Conv1d(width, width, 9, padding=4)
        self.classifier = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.classifier((h * mask).sum(dim=2) / mask.sum(dim=2).clamp_min(1))


def right_aligned_masks(lengths: list[int], total: int) -> torch.Tensor:
    """(B, 1, T) masks with each signal occupying the last ``length`` samples (SPEC section 3)."""
    positions = torch.arange(total)
    return torch.stack([(positions >= total - n).float()[None] for n in lengths])


def synthetic_task(n: int, total: int = 512, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three classes told apart by the period (32, 16, 8 samples) of a noisy 2-lead sinusoid,
    random lengths 256..T, right-aligned and zero-padded."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    periods = torch.tensor([32.0, 16.0, 8.0])[y]
    amplitude = 0.4 + 0.5 * torch.rand(n, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    t = torch.arange(total, dtype=torch.float32)
    lead_shift = torch.tensor([0.0, 1.0])[None, :, None]
    x = amplitude * torch.sin(2 * math.pi * t / periods[:, None, None] + phase + lead_shift)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    lengths = torch.randint(total // 2, total + 1, (n,), generator=g).tolist()
    mask = right_aligned_masks(lengths, total)
    return (x * mask).clamp(-1, 1), y, mask


@pytest.fixture(scope="module")
def trained():
    """A TinyCNN trained for about a second to near-perfect accuracy, plus a held-out batch."""
    torch.manual_seed(0)
    model = TinyCNN()
    x, y, mask = synthetic_task(1024, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(150):
        batch = slice((step * 64) % 1024, (step * 64) % 1024 + 64)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch], mask[batch]), y[batch]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    x_test, y_test, mask_test = synthetic_task(128, seed=2)
    with torch.no_grad():
        accuracy = (model(x_test, mask_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.95, f"the tiny CNN did not learn the synthetic task ({accuracy:.2f})"
    return model, x_test, y_test, mask_test


def predictions(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, mask).argmax(dim=1)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
