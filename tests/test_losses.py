"""Tests for losses.py: closed forms on linear models, brute-force Jacobians, the reference
code's per-class NSR loop on the real CNN, hand-made margins, the eps schedule, and the
adversarial-training term against the attack it runs."""
from __future__ import annotations

import math

import pytest
import scipy.special
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks
from training import losses
from ECG_CNN import build_model
from helpers import LinearModel, TinyCNN, right_aligned_masks


# ----------------------------------------------------------------------------- helpers


def weight_grads(model: nn.Module) -> torch.Tensor:
    """All parameter gradients concatenated (zeros where a parameter got none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def small_batch(seed: int = 0, batch: int = 3, leads: int = 2, total: int = 12
                ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, leads, total, generator=g, dtype=torch.float64) * 2 - 1
    lengths = [total, total - 3, total // 2][:batch]
    return x, right_aligned_masks(lengths, total, torch.float64)


def brute_force_jacobian_loss(model: nn.Module, x: torch.Tensor, mask: torch.Tensor
                              ) -> torch.Tensor:
    """sqrt(sum_i ||J_i||_F^2) / (B * C) with each J_i from autograd.functional.jacobian."""
    squared = 0
    for i in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(
            lambda xi: model(xi[None], mask[i:i + 1])[0], x[i], create_graph=True)
        squared = squared + jac.pow(2).sum()
    classes = jac.shape[0]
    return squared.sqrt() / (x.shape[0] * classes)


# ----------------------------------------------------------------------------- NSR loss1, loss2

def test_mse_onehot_loss_matches_hand_computation_and_mse_loss():
    logits = torch.tensor([[0.5, -1.0, 2.0], [1.0, 0.0, 0.0]])
    y = torch.tensor([2, 0])
    # Sample 0: 0.25 + 1 + 1 = 2.25; sample 1: 0; mean over the batch 1.125.
    assert losses.mse_onehot_loss(logits, y).item() == pytest.approx(1.125)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 9, generator=g)
    y = torch.randint(0, 9, (7,), generator=g)
    expected = F.mse_loss(logits, F.one_hot(y, 9).float(), reduction="sum") / 7
    torch.testing.assert_close(losses.mse_onehot_loss(logits, y), expected)


def reference_multi_margin(logits: torch.Tensor, y: torch.Tensor) -> float:
    """The protocol's loss2 written as plain Python loops."""
    kept = []
    for row, label in zip(logits.tolist(), y.tolist()):
        for j, value in enumerate(row):
            d = 1 - row[label] + value
            if j != label and 0 < d < 2:
                kept.append(d)
    return sum(kept) / len(kept) if len(kept) > 1 else sum(kept)


def test_multi_margin_loss_hand_made_logits():
    # Row 0 (y=0): d_j = z_j - 1 -> 0.5 kept, 0 (boundary) out, 2 (boundary) out, 1.75 kept,
    # -1 out. Row 1 (y=2): d_j = z_j -> 0.25 kept, -3 out, 4 out, 0.5 kept. The own class
    # (d = 1, inside (0, 2)) must not count. Mean of the 4 kept terms: 3.0 / 4.
    logits = torch.tensor([[2.0, 1.5, 1.0, 3.0, 2.75, 0.0],
                           [0.25, -3.0, 1.0, 4.0, 0.5, -2.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    loss = losses.multi_margin_loss(logits, y)
    assert loss.item() == pytest.approx(0.75)
    assert loss.item() == pytest.approx(reference_multi_margin(logits.detach(), y))
    # d(mean)/dz: +1/4 on each kept j, -(kept in the row)/4 on the row's own class.
    loss.backward()
    expected = torch.tensor([[-0.5, 0.25, 0, 0, 0.25, 0], [0.25, 0, -0.5, 0, 0.25, 0]])
    torch.testing.assert_close(logits.grad, expected)


def test_multi_margin_loss_single_and_zero_terms():
    y = torch.tensor([0])
    single = torch.tensor([[2.0, 1.5, -5.0]])  # one kept term, d = 0.5: its sum, not a mean
    assert losses.multi_margin_loss(single, y).item() == pytest.approx(0.5)
    separated = torch.tensor([[10.0, 0.0, 0.0]])  # d = -9: nothing kept
    assert losses.multi_margin_loss(separated, y).item() == 0.0
    assert losses.multi_margin_loss(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)).item() == 0.0
    two = torch.tensor([[2.0, 1.5, 2.5]])  # d = 0.5 and 1.5: mean 1.0
    assert losses.multi_margin_loss(two, y).item() == pytest.approx(1.0)


def test_multi_margin_loss_matches_loop_reference_on_random_logits():
    g = torch.Generator().manual_seed(2)
    for batch in (1, 2, 5, 16):
        logits = torch.randn(batch, 9, generator=g, dtype=torch.float64) * 1.5
        y = torch.randint(0, 9, (batch,), generator=g)
        assert losses.multi_margin_loss(logits, y).item() == pytest.approx(
            reference_multi_margin(logits, y), rel=1e-12, abs=1e-12)


# ----------------------------------------------------------------------------- NSR loss3

def test_nsr_loss_closed_form_on_linear_model():
    g = torch.Generator().manual_seed(3)
    classes, leads, total = 4, 2, 10
    weight = torch.randn(classes, leads, total, generator=g, dtype=torch.float64)
    bias = torch.tensor([3.0, 2.0, -100.0, 1.0], dtype=torch.float64)  # class 2 clipped by ReLU
    model = LinearModel(weight.clone(), bias.clone())
    x = torch.rand(4, leads, total, generator=g, dtype=torch.float64) * 2 - 1
    mask = right_aligned_masks([10, 7, 5, 10], total, torch.float64)
    y = torch.tensor([0, 1, 0, 2])

    loss = losses.nsr_loss(model, x, y, mask)

    # Hand formula as a differentiable function of (W, b): s_i = ReLU(W_y . (x_i m_i) + b_y),
    # ds_i/dx_i = W_y * m_i where s_i > 0 (0 otherwise), Noise_i = sum |W_y| m_i.
    w_ref = weight.clone().requires_grad_(True)
    b_ref = bias.clone().requires_grad_(True)
    s = F.relu((w_ref[y] * x * mask).sum(dim=(1, 2)) + b_ref[y])
    noise = (w_ref[y].abs() * mask).sum(dim=(1, 2)) * (s > 0)
    expected = torch.log1p(noise / (s + 0.01)).sum()
    torch.testing.assert_close(loss, expected)
    assert s[3].item() == 0  # the clipped sample contributes log(1 + 0) = 0

    loss.backward()
    expected.backward()
    assert model.weight.grad.abs().sum() > 0
    torch.testing.assert_close(model.weight.grad, w_ref.grad)
    torch.testing.assert_close(model.bias.grad, b_ref.grad)


def per_class_nsr_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """The reference code's loop: the model run again on each class's samples."""
    total = 0
    for c in y.unique().tolist():
        members = y == c
        x_c = x[members].detach().requires_grad_(True)
        s = F.relu(model(x_c, mask[members])[:, c])
        (g,) = torch.autograd.grad(s.sum(), x_c, create_graph=True)
        total = total + torch.log1p(g.abs().sum(dim=(1, 2)) / (s + 0.01)).sum()
    return total


def test_nsr_loss_vectorized_equals_per_class_loop_on_resnet18a():
    torch.manual_seed(4)
    model = build_model("resnet18a").double()
    with torch.no_grad():
        model.classifier.bias[:2] += 5.0  # positive own-class logits: ReLU not clipping
    total = 3072
    x = torch.rand(4, 8, total, dtype=torch.float64) * 2 - 1
    mask = right_aligned_masks([3072, 2500, 3072, 2000], total, torch.float64)
    y = torch.tensor([0, 1, 0, 1])  # two classes of two samples each

    loss = losses.nsr_loss(model, x, y, mask)
    loss.backward()
    vectorized_grad = weight_grads(model)
    model.zero_grad()
    reference = per_class_nsr_reference(model, x, y, mask)
    reference.backward()

    assert loss.item() > 0
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    assert vectorized_grad.abs().sum() > 0
    torch.testing.assert_close(vectorized_grad, weight_grads(model), rtol=1e-8, atol=1e-12)


# ----------------------------------------------------------------------------- Jacobian

def test_jacobian_loss_matches_brute_force_and_its_weight_gradient():
    torch.manual_seed(5)
    model = TinyCNN(classes=9, width=4).double()
    x, mask = small_batch()

    loss = losses.jacobian_loss(model, x, mask)
    loss.backward()
    grad = weight_grads(model)
    model.zero_grad()
    reference = brute_force_jacobian_loss(model, x, mask)
    reference.backward()

    torch.testing.assert_close(loss, reference)
    assert model.conv1.weight.grad.abs().sum() > 0  # create_graph: reaches the weights
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, weight_grads(model))


def test_jacobian_loss_on_linear_model_closed_form():
    # J_i = W * m_i (per class), so sum_i ||J_i||_F^2 = sum_i sum_k ||W_k * m_i||^2.
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(9, 2, 8, generator=g, dtype=torch.float64)
    model = LinearModel(weight, torch.zeros(9, dtype=torch.float64))
    x = torch.rand(2, 2, 8, generator=g, dtype=torch.float64)
    mask = right_aligned_masks([8, 3], 8, torch.float64)
    expected = (weight[None] * mask[:, None]).pow(2).sum().sqrt() / (2 * 9)
    torch.testing.assert_close(losses.jacobian_loss(model, x, mask), expected)


def test_jacobian_loss_on_resnet18a_matches_per_sample_brute_force():
    # Each sample alone through autograd.functional.jacobian: also checks that the batched
    # computation has no cross-sample leakage with different paddings (GroupNorm per sample).
    torch.manual_seed(7)
    model = build_model("resnet18a").double()
    x = torch.rand(2, 8, 3072, dtype=torch.float64) * 2 - 1
    mask = right_aligned_masks([3072, 2200], 3072, torch.float64)
    torch.testing.assert_close(losses.jacobian_loss(model, x, mask).detach(),
                               brute_force_jacobian_loss(model, x, mask).detach())


def test_jacobian_projection_estimate_is_unbiased_with_shrinking_error():
    torch.manual_seed(8)
    model = TinyCNN(classes=9, width=4).double()
    x, mask = small_batch(seed=1)
    exact = losses.jacobian_squared_norm(model, x, mask).item()
    g = torch.Generator().manual_seed(9)
    draws = 150
    rms_errors = {}
    for k in (1, 4, 16):
        estimates = torch.tensor([losses.jacobian_squared_norm(model, x, mask, k, g).item()
                                  for _ in range(draws)])
        standard_error = estimates.std().item() / math.sqrt(draws)
        assert abs(estimates.mean().item() - exact) < 4 * standard_error
        rms_errors[k] = (estimates - exact).pow(2).mean().sqrt().item()
    # The standard deviation of a K-projection average falls like 1 / sqrt(K): x2 per x4.
    assert 1.6 < rms_errors[1] / rms_errors[4] < 2.5
    assert 1.6 < rms_errors[4] / rms_errors[16] < 2.5
    assert rms_errors[16] < 0.2 * exact


def test_jacobian_loss_projections_reproducible_and_differentiable():
    torch.manual_seed(10)
    model = TinyCNN(classes=9, width=4).double()
    x, mask = small_batch(seed=2)
    first = losses.jacobian_loss(model, x, mask, 2, torch.Generator().manual_seed(0))
    again = losses.jacobian_loss(model, x, mask, 2, torch.Generator().manual_seed(0))
    squared = losses.jacobian_squared_norm(model, x, mask, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, again)
    torch.testing.assert_close(first, squared.sqrt() / (3 * 9))
    first.backward()
    assert model.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="projections"):
        losses.jacobian_loss(model, x, mask, -1)


# ----------------------------------------------------------------------------- eps schedule

def test_adversarial_eps_schedule_and_step():
    eps = 0.01
    schedule = [losses.adversarial_eps(epoch, eps) for epoch in range(70)]
    assert schedule[:10] == [0.0] * 10
    assert schedule[10] == pytest.approx(eps / 60)
    assert schedule[69] == pytest.approx(eps)
    for epoch in range(10, 70):
        assert schedule[epoch] == pytest.approx(eps * (epoch - 9) / 60)
    assert losses.adversarial_step(schedule[40]) == pytest.approx(4 * schedule[40] / 20)
    assert losses.adversarial_step(0.02, alpha=2, steps=10) == pytest.approx(0.004)
    # Short runs: from epoch 0 over a single epoch the budget is eps at once.
    assert losses.adversarial_eps(0, eps, start_epoch=0, epochs=1) == pytest.approx(eps)
    assert losses.adversarial_eps(75, eps) == pytest.approx(eps)  # past the schedule
    assert losses.adversarial_eps(1, eps, start_epoch=2, epochs=2) == 0.0
    with pytest.raises(ValueError, match="epochs"):
        losses.adversarial_eps(2, eps, start_epoch=2, epochs=2)


# ----------------------------------------------------------------------------- adversarial loss

@pytest.fixture(scope="module")
def correct_tiny(trained_tiny):
    """conftest's trained_tiny with only its correctly classified samples (those the adversarial
    term attacks)."""
    model, x, y, mask = trained_tiny
    with torch.no_grad():
        correct = model(x, mask).argmax(dim=1) == y
    return model, x[correct], y[correct], mask[correct]


def test_adversarial_loss_is_ce_on_the_attack_it_requests(correct_tiny, monkeypatch):
    model, x, y, mask = correct_tiny
    calls = []
    real_pgd = attacks.pgd_attack

    def recording_pgd(*args, **kwargs):
        x_adv = real_pgd(*args, **kwargs)
        calls.append((args, kwargs, x_adv))
        return x_adv

    monkeypatch.setattr(attacks, "pgd_attack", recording_pgd)
    generator = torch.Generator().manual_seed(0)
    loss = losses.adversarial_loss(model, x, y, mask, 0.05, 0.01, steps=20, generator=generator)

    (args, kwargs, x_adv), = calls
    assert args[4] == 0.05 and args[0] is model
    assert kwargs == dict(norm="inf", steps=20, step_size=0.01, random_start=True, restarts=1,
                          early_stop=False, loss_fn=attacks.soft_margin_loss,
                          generator=generator)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert ((x_adv - x) * (1 - mask)).abs().max() == 0
    torch.testing.assert_close(loss, F.cross_entropy(model(x_adv, mask), y, reduction="sum"))


def test_adversarial_loss_exceeds_clean_ce(correct_tiny):
    model, x, y, mask = correct_tiny
    clean = F.cross_entropy(model(x, mask), y, reduction="sum")
    for seed in range(3):
        adversarial = losses.adversarial_loss(model, x, y, mask, 0.05, 0.01,
                                              generator=torch.Generator().manual_seed(seed))
        assert adversarial > 1.2 * clean


def test_adversarial_loss_label_smoothing(correct_tiny):
    model, x, y, mask = correct_tiny
    smoothing = 0.1
    plain = losses.adversarial_loss(model, x, y, mask, 0.05, 0.01,
                                    generator=torch.Generator().manual_seed(0))
    smoothed = losses.adversarial_loss(model, x, y, mask, 0.05, 0.01, label_smoothing=smoothing,
                                       generator=torch.Generator().manual_seed(0))
    # Same generator, same attack (it ignores the smoothing): rebuild X_adv and apply the
    # smoothed CE by hand: (1 - s) * (-log p_y) + s * mean_k(-log p_k), summed over samples.
    x_adv = attacks.pgd_attack(model, x, y, mask, 0.05, norm="inf", steps=20, step_size=0.01,
                               restarts=1, early_stop=False, loss_fn=attacks.soft_margin_loss,
                               generator=torch.Generator().manual_seed(0))
    log_p = F.log_softmax(model(x_adv, mask), dim=1)
    own = -log_p.gather(1, y[:, None]).squeeze(1)
    expected = ((1 - smoothing) * own - smoothing * log_p.mean(dim=1)).sum()
    torch.testing.assert_close(smoothed, expected)
    torch.testing.assert_close(plain, own.sum())
    assert not torch.isclose(plain, smoothed)


@pytest.mark.parametrize("training", [True, False])
def test_adversarial_loss_gradient_and_mode(correct_tiny, training):
    model, x, y, mask = correct_tiny
    mode = model.training
    model.train(training)
    model.zero_grad(set_to_none=True)  # the model is shared: other tests' backward passes leave .grad
    try:
        loss = losses.adversarial_loss(model, x, y, mask, 0.05, 0.01,
                                       generator=torch.Generator().manual_seed(0))
        assert all(module.training == training for module in model.modules())
        assert all(p.grad is None for p in model.parameters())  # the attack leaves no .grad
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(mode)


def test_empty_batches_give_zero():
    model = TinyCNN()
    x, y, mask = torch.zeros(0, 2, 16), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 16)
    assert losses.nsr_loss(model, x, y, mask).item() == 0.0
    assert losses.adversarial_loss(model, x, y, mask, 0.01, 0.002).item() == 0.0


# ----------------------------------------------------------------------------- TRADES and fast AT

def test_trades_kl_is_the_summed_kl_divergence_of_the_softmaxes():
    """Against scipy's elementwise relative entropy p log(p / q), summed over classes and samples."""
    g = torch.Generator().manual_seed(0)
    clean, adversarial = 3 * torch.randn(5, 9, generator=g, dtype=torch.float64), \
        3 * torch.randn(5, 9, generator=g, dtype=torch.float64)
    p, q = F.softmax(clean, dim=1).numpy(), F.softmax(adversarial, dim=1).numpy()
    expected = scipy.special.rel_entr(p, q).sum()
    assert losses.trades_kl(clean, adversarial).item() == pytest.approx(expected, rel=1e-10)
    assert losses.trades_kl(clean, clean).item() == pytest.approx(0, abs=1e-12)
    # the order of the arguments matters: KL(clean || adversarial)
    assert losses.trades_kl(adversarial, clean).item() == pytest.approx(scipy.special.rel_entr(q, p).sum())


class ModeRecordingModel(nn.Module):
    """Records the mode of every forward pass of the model it wraps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.modes = model, []

    def forward(self, x, mask):
        self.modes.append(self.training)
        return self.model(x, mask)


def test_trades_attack_stays_on_the_signal_in_the_ball_and_raises_the_kl(trained_tiny):
    model, x, y, mask = trained_tiny
    x, mask = x[:16], mask[:16]
    recording = ModeRecordingModel(model).train()
    eps = 0.05
    x_adv = losses.trades_attack(recording, x, mask, eps, eps / 4, steps=10, generator=torch.Generator().manual_seed(0))
    delta = x_adv - x
    assert delta.abs().max() <= eps + 1e-6 and delta.abs().max() > 0.9 * eps
    assert (delta * (1 - mask)).abs().max() == 0  # never on the padding
    assert x_adv.abs().max() <= 1
    assert recording.modes == [False] * 11 and recording.training  # eval during the attack, then restored
    with torch.no_grad():
        clean = model(x, mask)
        start = x + losses.TRADES_START_SD * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * mask
        assert losses.trades_kl(clean, model(x_adv, mask)) > 10 * losses.trades_kl(clean, model(start, mask))
