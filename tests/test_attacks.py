"""Tests for attacks.py: the losses, budgets and masks, early stop, closed forms on linear
models, strength against white noise and the Adversarial Robustness Toolbox's masked PGD, and
the model's state."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from art.attacks.evasion import ProjectedGradientDescentPyTorch
from art.estimators.classification import PyTorchClassifier

import attacks
from perturbations import noises
from ECG_CNN import build_model
from helpers import (LinearModel, RecordingModel, TinyCNN, binary_linear_problem, generator, per_sample_norms,
                     predictions, right_aligned_masks)


# ----------------------------------------------------------------------------- helpers

def weight_gap(model: LinearModel, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(w_other - w_y) * mask per sample: the direction that lowers the margin z_y - z_other."""
    with torch.no_grad():
        return (model.weight[1 - y] - model.weight[y]) * mask


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per sample."""
    with torch.no_grad():
        logits = model(x, mask)
    own = logits.gather(1, y[:, None]).squeeze(1)
    return own - logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values


# ----------------------------------------------------------------------------- losses

def test_ce_loss_is_summed_cross_entropy():
    logits, y = torch.randn(5, 9), torch.randint(0, 9, (5,))
    expected = sum(-torch.log_softmax(logits[i], 0)[y[i]] for i in range(5))
    torch.testing.assert_close(attacks.ce_loss(logits, y), expected)


def test_soft_margin_loss_matches_brute_force():
    logits, y = torch.randn(6, 9, dtype=torch.float64), torch.randint(0, 9, (6,))
    expected = 0.0
    for row, label in zip(logits.tolist(), y.tolist()):
        others = [v for j, v in enumerate(row) if j != label]
        expected += math.log(sum(math.exp(v) for v in others)) - row[label]
    assert attacks.soft_margin_loss(logits, y).item() == pytest.approx(expected, rel=1e-12)


def test_dlr_loss_matches_brute_force():
    logits, y = torch.randn(7, 9, dtype=torch.float64), torch.randint(0, 9, (7,))
    logits[0, :3] = 5.0  # a tie among the top logits
    y[0] = 1
    for row, label, got in zip(logits.tolist(), y.tolist(), attacks.dlr_losses(logits, y).tolist()):
        ranked = sorted(row, reverse=True)
        best_other = max(v for j, v in enumerate(row) if j != label)
        assert got == pytest.approx(-(row[label] - best_other) / (ranked[0] - ranked[2] + 1e-12),
                                    rel=1e-12, abs=1e-12)
    assert attacks.dlr_loss(logits, y).item() == pytest.approx(attacks.dlr_losses(logits, y).sum().item())
    with pytest.raises(ValueError, match="at least 3 classes"):
        attacks.dlr_losses(torch.randn(2, 2), torch.tensor([0, 1]))


def test_targeted_dlr_loss_matches_numpy_by_hand():
    # Croce and Hein (ICML 2020), eq. 5, computed in numpy with a full sort.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(8, 9))
    logits[0, [2, 5, 7, 8]] = 3.0  # ties among the top four
    y, target = rng.integers(0, 9, 8), rng.integers(0, 9, 8)
    ranked = -np.sort(-logits, axis=1)
    rows = np.arange(8)
    expected = -(logits[rows, y] - logits[rows, target]) / (ranked[:, 0] - (ranked[:, 2] + ranked[:, 3]) / 2 + 1e-12)
    got = attacks.dlr_targeted_losses(torch.from_numpy(logits), torch.from_numpy(y), torch.from_numpy(target))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least 4 classes"):
        attacks.dlr_targeted_losses(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([1, 2]))


# ----------------------------------------------------------------------------- budgets and masks

@pytest.mark.parametrize("norm, eps", [("inf", 0.05), (2, 0.5)])
@pytest.mark.parametrize("early_stop", [True, False])
def test_pgd_stays_in_ball_inside_mask_and_range(norm, eps, early_stop):
    torch.manual_seed(0)
    model = TinyCNN().eval()
    mask = right_aligned_masks([200, 256, 130, 256], 256)
    x = (2 * torch.rand(4, 2, 256) - 1) * mask  # values up to +-1: the clip is exercised
    y = torch.randint(0, 3, (4,))
    x_adv = attacks.pgd_attack(model, x, y, mask, eps, norm=norm, steps=5, step_size=eps / 2,
                               early_stop=early_stop, generator=generator())
    delta = x_adv - x
    linf, l2 = per_sample_norms(delta)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert (linf <= eps + 1e-6).all() if norm == "inf" else (l2 <= eps * (1 + 1e-5)).all()
    assert (linf > 0).any(), "the attack did not move"
    assert torch.equal(x_adv * (1 - mask), x * (1 - mask)), "padding changed"
    assert x_adv.abs().max() <= 1


@pytest.mark.parametrize("norm, eps", [("inf", 0.05), ("l2", 0.5)])
def test_random_start_is_inside_ball_and_masked(norm, eps):
    model = TinyCNN().eval()
    mask = right_aligned_masks([300, 512], 512)
    x = 0.5 * torch.rand(2, 2, 512) * mask
    start = attacks.pgd_attack(model, x, torch.tensor([0, 1]), mask, eps, norm=norm, steps=0,
                               early_stop=False, generator=generator())
    delta = start - x
    linf, l2 = per_sample_norms(delta)
    assert torch.equal(delta * (1 - mask), torch.zeros_like(delta))
    if norm == "inf":  # U(-eps, eps) on every signal sample: the extremes come close to eps
        assert (linf <= eps).all() and (linf > 0.99 * eps).all()
        assert (delta.abs() > 0)[mask.expand_as(delta).bool()].float().mean() > 0.99
    else:  # eps * U(-1, 1) on hundreds of samples is far longer than eps: scaled to eps
        torch.testing.assert_close(l2, torch.full((2,), eps), rtol=1e-5, atol=0)


def test_zero_budget_returns_input_and_bad_arguments_raise():
    model, x, y, mask = binary_linear_problem([64, 40])
    for attack in (attacks.pgd_attack, attacks.ifgsm_attack):
        out = attack(model, x, y, mask, 0.0)
        assert torch.equal(out, x) and out is not x
    with pytest.raises(ValueError, match="eps"):
        attacks.pgd_attack(model, x, y, mask, -0.1)
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd_attack(model, x, y, mask, 0.1, norm="l1")
    with pytest.raises(ValueError, match="mask"):
        attacks.pgd_attack(model, x, y, mask[:, :, :10], 0.1)
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd_attack(model, x, y, mask, 0.1, steps=-1)


@pytest.mark.parametrize("spelling, same_as", [("linf", "inf"), (math.inf, "inf"),
                                               ("L2", 2), ("2", 2)])
def test_norm_spellings_are_equivalent(spelling, same_as):
    model, x, y, mask = binary_linear_problem([64, 50])
    run = lambda norm: attacks.ifgsm_attack(model, x, y, mask, 0.1, norm=norm, steps=3,
                                            early_stop=False)
    assert torch.equal(run(spelling), run(same_as))


# ----------------------------------------------------------------------------- closed forms

def test_linf_step_on_linear_model_is_sign_of_weight_difference():
    model, x, y, mask = binary_linear_problem([64, 64, 33, 50])
    step = 0.01
    x_adv = attacks.ifgsm_attack(model, x, y, mask, eps=0.05, steps=1, step_size=step,
                                 early_stop=False)
    # CE gradient of a 2-class linear model: p_other (w_other - w_y) * mask, p_other > 0.
    expected = step * weight_gap(model, y, mask).sign()
    torch.testing.assert_close(x_adv - x, expected, rtol=0, atol=1e-7)


def test_l2_step_on_linear_model_is_normalized_weight_difference():
    model, x, y, mask = binary_linear_problem([64, 40])
    gap = weight_gap(model, y, mask)
    x_adv = attacks.ifgsm_attack(model, x, y, mask, eps=1.0, norm=2, steps=1, step_size=0.2,
                                 early_stop=False)
    expected = 0.2 * gap / gap.flatten(1).norm(dim=1)[:, None, None]
    torch.testing.assert_close(x_adv - x, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("norm, dual, random_start", [("inf", 1, True), (2, 2, False)])
def test_attack_reaches_closed_form_optimum_on_linear_model(norm, dual, random_start):
    # max over ||delta|| <= eps of the margin drop <w_other - w_y, delta * mask> is eps times
    # the dual norm of the masked weight gap (L1 for L-inf, L2 for L2). L-inf PGD gets there
    # from any random start within 2 eps / step steps; L2 PGD from a random start only turns
    # towards the optimum gradually, so L2 starts from x (exact after eps / step steps).
    model, x, y, mask = binary_linear_problem([64, 64, 20, 47])
    eps = 0.1 if norm == "inf" else 0.5
    x_adv = attacks.pgd_attack(model, x, y, mask, eps, norm=norm, steps=25, early_stop=False,
                               random_start=random_start, generator=generator())
    achieved = margins(model, x, y, mask) - margins(model, x_adv, y, mask)
    optimum = eps * weight_gap(model, y, mask).flatten(1).norm(p=dual, dim=1)
    torch.testing.assert_close(achieved, optimum, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- early stop

def test_early_stop_freezes_each_sample_at_its_first_fooling_iterate():
    # Each IFGSM L-inf step lowers a sample's margin by step * ||gap * mask||_1. Inputs are
    # built so the margin is (k - 0.5) steps' worth: the sample is first fooled after k steps.
    total, step, eps = 64, 0.01, 0.1
    model, x, y, mask = binary_linear_problem([64, 50, 64, 40, 30], total)
    y = torch.zeros(5, dtype=torch.long)
    gap = weight_gap(model, y, mask)
    first_fooled = torch.tensor([3.0, 7.0, 1.0, math.inf, 0.0])  # inf: never, 0: clean-wrong
    steps_of_margin = torch.tensor([2.5, 6.5, 0.5, 12.5, -0.5])
    drop_per_step = step * gap.flatten(1).abs().sum(dim=1)
    shift = (margins(model, x, y, mask) - steps_of_margin * drop_per_step) / drop_per_step
    x = x + shift[:, None, None] * step * gap.sign()  # moves each margin to its target
    assert x.abs().max() < 1 - eps, "test inputs would be clipped"

    x_adv = attacks.ifgsm_attack(model, x, y, mask, eps, steps=20, step_size=step)
    k = first_fooled.clamp(max=eps / step)  # never fooled: walks to the boundary, eps
    torch.testing.assert_close(x_adv - x, k[:, None, None] * step * gap.sign(), rtol=0, atol=1e-5)
    assert torch.equal(x_adv[4], x[4]), "a clean-wrong sample was attacked"
    fooled = margins(model, x_adv, y, mask) < 0
    assert fooled.tolist() == [True, True, True, False, True]

    no_stop = attacks.ifgsm_attack(model, x, y, mask, eps, steps=20, step_size=step,
                                   early_stop=False)
    torch.testing.assert_close(no_stop - x, eps * gap.sign(), rtol=0, atol=1e-5)


def test_early_stop_returns_the_first_fooling_iterate_exactly(trained_tiny):
    model, x, y, mask = trained_tiny
    recorder = RecordingModel(model)
    x_adv = attacks.pgd_attack(recorder, x, y, mask, 0.2, steps=10, restarts=1,
                               generator=generator())
    iterates = torch.stack(recorder.iterates)  # (steps, B, leads, T)
    wrong = torch.stack([predictions(model, it, mask) != y for it in iterates])
    broken = wrong.any(dim=0)
    assert 0 < broken.sum() < len(y), "the test needs some but not all samples broken"
    first = wrong.float().argmax(dim=0)
    assert torch.equal(x_adv[broken], iterates[first[broken], broken.nonzero().squeeze(1)])


def test_clean_wrong_samples_are_returned_unchanged(trained_tiny):
    model, x, y, mask = trained_tiny
    y_wrong = (y + 1) % 3
    x_adv = attacks.pgd_attack(model, x[:8], y_wrong[:8], mask[:8], 0.2, steps=5,
                               generator=generator())
    assert torch.equal(x_adv, x[:8])


def test_restarts_never_lower_the_number_of_broken_samples(trained_tiny):
    model, x, y, mask = trained_tiny
    run = lambda restarts: attacks.pgd_attack(model, x, y, mask, 0.2, steps=10,
                                              restarts=restarts, generator=generator(3))
    one, two = run(1), run(2)
    broken_one = predictions(model, one, mask) != y
    broken_two = predictions(model, two, mask) != y
    assert broken_one.any() and not broken_two.all()
    assert not (broken_one & ~broken_two).any(), "a second start unbroke a sample"
    assert torch.equal(two[broken_one], one[broken_one]), "the first start differs"
    assert broken_two.sum() >= broken_one.sum()


# ----------------------------------------------------------------------------- strength

class MaskAsChannel(nn.Module):
    """ART calls ``model(x)``: the mask travels as one more input channel, which ART's own
    ``mask`` argument leaves unperturbed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x_and_mask: torch.Tensor) -> torch.Tensor:
        return self.model(x_and_mask[:, :-1], x_and_mask[:, -1:])


def art_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, eps: float,
            steps: int, random_start: bool) -> torch.Tensor:
    """ART's L-inf PGD (step eps / 10, no early stop) on the masked signal, inputs in [-1, 1]."""
    classifier = PyTorchClassifier(MaskAsChannel(model), loss=nn.CrossEntropyLoss(),
                                   input_shape=(x.shape[1] + 1, x.shape[2]), nb_classes=3,
                                   clip_values=(-1.0, 1.0), device_type="cpu")
    pgd = ProjectedGradientDescentPyTorch(classifier, norm=np.inf, eps=eps, eps_step=eps / 10,
                                          max_iter=steps, num_random_init=int(random_start),
                                          batch_size=len(x), verbose=False)
    inputs = torch.cat([x, mask], dim=1).numpy()
    where = torch.cat([mask.expand_as(x), torch.zeros_like(mask)], dim=1).numpy()
    np.random.seed(0)  # ART draws its random start from numpy's global generator
    return torch.from_numpy(pgd.generate(inputs, y.numpy(), mask=where))[:, :-1]


def test_pgd_breaks_at_least_as_many_as_white_noise_and_art(trained_tiny):
    model, x, y, mask = trained_tiny
    eps, steps = 0.2, 20
    ours = attacks.pgd_attack(model, x, y, mask, eps, steps=steps, generator=generator())
    noisy = noises.white_noise(x, eps, generator=generator())
    theirs = art_pgd(model, x, y, mask, eps, steps, random_start=True)
    assert torch.equal(theirs * (1 - mask), x * (1 - mask)), "ART perturbed the padding"
    broken = {name: int((predictions(model, inputs, mask) != y).sum())
              for name, inputs in [("pgd", ours), ("white", noisy), ("art", theirs)]}
    assert broken["pgd"] > broken["white"], broken
    assert broken["pgd"] >= broken["art"] > 0, broken


def test_ifgsm_matches_art_pgd_without_random_start(trained_tiny):
    # Same algorithm (no random start, no early stop, L-inf, masked) in another library:
    # the iterates agree up to float rounding.
    model, x, y, mask = trained_tiny
    ours = attacks.ifgsm_attack(model, x, y, mask, 0.1, steps=10, early_stop=False)
    theirs = art_pgd(model, x, y, mask, 0.1, steps=10, random_start=False)
    agree = ((ours - theirs).abs() < 1e-5).float().mean().item()
    assert agree > 0.999, f"only {agree:.4f} of the elements agree"


def test_batch_result_equals_per_sample_results(trained_tiny):
    # No cross-sample leakage: norms, steps and freezing are per sample (float64 rules out
    # rounding differences between batch sizes).
    model, x, y, mask = trained_tiny
    model64 = TinyCNN()
    model64.load_state_dict(model.state_dict())
    model64 = model64.double().eval()
    x, mask = x[:6].double(), mask[:6].double()
    for norm, eps in [("inf", 0.2), (2, 2.0)]:
        batch = attacks.ifgsm_attack(model64, x, y[:6], mask, eps, norm=norm, steps=8)
        alone = torch.cat([attacks.ifgsm_attack(model64, x[i:i + 1], y[i:i + 1], mask[i:i + 1],
                                                eps, norm=norm, steps=8) for i in range(6)])
        torch.testing.assert_close(batch, alone, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- model state

@pytest.mark.parametrize("training", [False, True])
def test_attacks_keep_model_mode_and_leave_no_parameter_grad(training):
    torch.manual_seed(0)
    model = TinyCNN().train(training)
    mask = right_aligned_masks([256, 200], 256)
    x, y = torch.rand(2, 2, 256) * mask, torch.tensor([0, 2])
    with torch.no_grad():  # callers often evaluate under no_grad; the attack needs gradients
        for early_stop in (True, False):
            attacks.pgd_attack(model, x, y, mask, 0.1, steps=3, early_stop=early_stop)
            attacks.ifgsm_attack(model, x, y, mask, 0.5, norm=2, steps=3, early_stop=early_stop,
                                 loss_fn=attacks.soft_margin_loss)
    assert model.training is training
    assert all(p.grad is None for p in model.parameters())


def test_real_model_small_length():
    torch.manual_seed(0)
    model = build_model("resnet18a").eval()
    mask = right_aligned_masks([4096, 3500], 4096)
    x = 0.9 * (2 * torch.rand(2, 8, 4096) - 1) * mask
    y = predictions(model, x, mask)  # clean-correct by construction: both get attacked
    for norm, eps, restarts in [("inf", 0.01, 2), (2, 1.0, 1)]:
        x_adv = attacks.pgd_attack(model, x, y, mask, eps, norm=norm, steps=1, restarts=restarts,
                                   generator=generator())
        linf, l2 = per_sample_norms(x_adv - x)
        assert ((linf <= eps + 1e-6) if norm == "inf" else (l2 <= eps * (1 + 1e-5))).all()
        assert (linf > 0).all()
        assert torch.equal(x_adv * (1 - mask), x * (1 - mask))
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_random_starts_are_reproducible_with_a_generator():
    model, x, y, mask = binary_linear_problem([64, 40])
    run = lambda seed: attacks.pgd_attack(model, x, y, mask, 0.1, steps=2, early_stop=False,
                                          generator=generator(seed))
    assert torch.equal(run(5), run(5)) and not torch.equal(run(5), run(6))
