"""Tests for autoattack.py: Auto-PGD's checkpoints and its first-fooling and best points, APGD-T's
targets, Square's starts, windows and schedule, the ensemble's versions and report, the budget,
mask, clip and model state of all of them, their strength against the Adversarial Robustness
Toolbox's APGD and Square, AutoAttack's checks, and a model with masked gradients that fools PGD
but not the ensemble."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack
from art.estimators.classification import PyTorchClassifier

import attacks
from perturbations import autoattack
from analysis.compare import masking_check
from analysis.metrics import class_balanced_accuracy, confusion_matrix
from helpers import (LinearModel, RecordingModel, TinyCNN, binary_linear_problem, generator, per_sample_norms,
                     predictions, right_aligned_masks, sinusoid_task)


# ----------------------------------------------------------------------------- Auto-PGD, Square, ensemble

def test_apgd_checkpoints_are_the_published_ones():
    # Croce and Hein (ICML 2020): p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99, computed
    # by hand from p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06); checkpoints ceil(p_j N).
    assert autoattack.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert autoattack.apgd_checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert autoattack.apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]  # ceil(2.2) = 3, ceil(5.7) = 6, ...


def test_apgd_dlr_needs_three_classes():
    model, x, y, mask = binary_linear_problem([64, 40])
    with pytest.raises(ValueError, match="at least 3 classes"):
        autoattack.apgd_attack(model, x, y, mask, 0.1, loss="dlr", steps=2)


ATTACKS = {
    "apgd-ce-linf": lambda m, x, y, mask, eps, g: autoattack.apgd_attack(
        m, x, y, mask, eps, steps=6, generator=g),
    "apgd-dlr-linf": lambda m, x, y, mask, eps, g: autoattack.apgd_attack(
        m, x, y, mask, eps, steps=6, loss="dlr", restarts=2, generator=g),
    "apgd-ce-l2": lambda m, x, y, mask, eps, g: autoattack.apgd_attack(
        m, x, y, mask, 10 * eps, norm=2, steps=6, generator=g),
    "square-linf": lambda m, x, y, mask, eps, g: autoattack.square_attack(
        m, x, y, mask, eps, queries=30, generator=g),
    "apgd-t-linf": lambda m, x, y, mask, eps, g: autoattack.apgd_attack(
        m, x, y, mask, eps, steps=4, loss="dlr_targeted", target_classes=2, generator=g),
    "square-stripes-start": lambda m, x, y, mask, eps, g: autoattack.square_attack(
        m, x, y, mask, eps, queries=30, generator=g, start="stripes"),
    "ensemble-linf": lambda m, x, y, mask, eps, g: autoattack.ensemble_attack(
        m, x, y, mask, eps, steps=4, queries=20, generator=g)[0],
    "ensemble-fast-linf": lambda m, x, y, mask, eps, g: autoattack.ensemble_attack(
        m, x, y, mask, eps, version="fast", steps=4, queries=20, generator=g)[0],
}
NEEDS_FOUR_CLASSES = ("apgd-t-linf", "ensemble-linf")  # APGD-T


@pytest.mark.parametrize("name", ATTACKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_new_attacks_keep_budget_mask_clip_type_and_model_state(name, dtype):
    torch.manual_seed(0)
    model = TinyCNN(classes=5).to(dtype).train()  # train mode: the attack must leave it so
    mask = right_aligned_masks([200, 256, 130, 256, 90, 256], 256).to(dtype)
    x = ((2 * torch.rand(6, 2, 256) - 1) * mask).to(dtype)  # up to +-1: the clip is exercised
    with torch.no_grad():
        y = (model(x, mask).argmax(dim=1))  # clean-correct: every sample is attacked
    eps = 0.05
    with torch.no_grad():  # callers often evaluate under no_grad
        x_adv = ATTACKS[name](model, x, y, mask, eps, generator())
    delta = x_adv - x
    linf, l2 = per_sample_norms(delta)
    assert x_adv.shape == x.shape and x_adv.dtype == dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    if name.endswith("l2"):
        assert (l2 <= 10 * eps * (1 + 1e-5)).all()
    else:
        assert (linf <= eps * (1 + 1e-6)).all()
    assert (linf > 0).all(), "a sample was not attacked"
    assert torch.equal(x_adv * (1 - mask), x * (1 - mask)), "padding changed"
    assert x_adv.abs().max() <= 1
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", [name for name in ATTACKS if name not in NEEDS_FOUR_CLASSES])
def test_new_attacks_are_reproducible_and_leave_clean_wrong_samples(name, trained_tiny):
    model, x, y, mask = trained_tiny
    x, y, mask = x[:12], y[:12], mask[:12]
    run = lambda seed, labels=y: ATTACKS[name](model, x, labels, mask, 0.2, generator(seed))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(run(1, (y + 1) % 3), x), "a clean-wrong sample was attacked"


def test_apgd_returns_first_fooling_iterate_and_best_point_otherwise(trained_tiny):
    # Broken samples stop at the first iterate the model misclassifies; survivors come back
    # at their iterate of highest loss. The batch shrinks as samples break, so each recorded
    # row is matched to its sample by distance (samples differ far more than 2 eps).
    model, x, y, mask = trained_tiny
    recorder = RecordingModel(model)
    x_adv = autoattack.apgd_attack(recorder, x, y, mask, 0.2, steps=10, generator=generator())
    rows = torch.cat(recorder.iterates)  # every input the attack took a gradient at, in order
    owner = torch.cdist(rows.flatten(1), x.flatten(1), p=float("inf")).argmin(dim=1)
    wrong = predictions(model, x_adv, mask) != y
    assert 0 < wrong.sum() < len(y), "the test needs some but not all samples broken"
    for i in range(len(y)):
        mine = rows[owner == i]
        assert (mine - x[i]).abs().max() <= 0.2 + 1e-6
        with torch.no_grad():
            logits = model(mine, mask[i].expand(len(mine), -1, -1))
        fooled = logits.argmax(dim=1) != y[i]
        if wrong[i]:
            assert torch.equal(x_adv[i], mine[fooled.nonzero()[0, 0]])
            assert fooled.nonzero()[0, 0] == len(mine) - 1, "attacked after it broke"
        else:
            losses = F.cross_entropy(logits, y[i].expand(len(mine)), reduction="none")
            assert not fooled.any() and torch.equal(x_adv[i], mine[losses.argmax()])


@pytest.mark.parametrize("start", autoattack.SQUARE_STARTS)
def test_square_windows_stay_inside_the_signal_and_at_the_ball_corners(start):
    # Every signal sample of Square's output sits at x +- eps (or the clip): both starts put
    # every sample at a corner and windows only move them between corners.
    torch.manual_seed(0)
    model = TinyCNN().eval()
    mask = right_aligned_masks([256, 100, 30], 256)
    x = 0.5 * (2 * torch.rand(3, 2, 256) - 1) * mask
    y = predictions(model, x, mask)
    x_adv = autoattack.square_attack(model, x, y, mask, 0.1, queries=50, generator=generator(), start=start)
    delta = (x_adv - x)[mask.expand_as(x).bool()]
    torch.testing.assert_close(delta.abs(), torch.full_like(delta, 0.1), rtol=0, atol=1e-6)
    assert torch.equal(x_adv * (1 - mask), x * (1 - mask))


def test_square_starts_are_stripes_along_time_or_one_sign_per_lead():
    # One query is the start alone: "stripes" draws a sign per lead and time sample (both signs
    # along each lead's signal), "lead" one sign per lead over its whole signal.
    model = TinyCNN().eval()
    mask = right_aligned_masks([256, 128], 256)
    x = torch.zeros(2, 2, 256)
    y = predictions(model, x, mask)
    for start, changes_along_time in (("stripes", True), ("lead", False)):
        delta = autoattack.square_attack(model, x, y, mask, 0.1, queries=1, generator=generator(), start=start)
        for sample in range(2):
            signal = delta[sample][:, mask[sample, 0].bool()]
            assert (signal.abs() == 0.1).all()
            assert all((len(lead.unique()) == 2) == changes_along_time for lead in signal), start
    with pytest.raises(ValueError, match="start 'squares' is not one of"):
        autoattack.square_attack(model, x, y, mask, 0.1, start="squares")


def test_square_fraction_follows_the_published_schedule():
    # Andriushchenko et al.: p halves after 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000
    # of 10,000 iterations.
    halvings = [10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000]
    for query in range(0, 10000, 7):
        expected = 0.8 / 2 ** sum(query > h for h in halvings)
        assert autoattack.square_fraction(0.8, query, 10000) == pytest.approx(expected)


def test_ensemble_reports_who_broke_each_sample(trained_tiny):
    model, x, y, mask = trained_tiny
    y = y.clone()
    y[:3] = (y[:3] + 1) % 3  # clean-wrong
    x_adv, broken_by = autoattack.ensemble_attack(model, x, y, mask, 0.2, version="fast", steps=5, queries=30,
                                                  generator=generator())
    assert broken_by[:3] == ["clean"] * 3
    assert set(broken_by) <= {"clean", "", *autoattack.ENSEMBLE_VERSIONS["fast"]}
    wrong = (predictions(model, x_adv, mask) != y).tolist()
    assert wrong == [by != "" for by in broken_by]
    assert "apgd-ce" in broken_by and "" in broken_by, broken_by


def _one_reachable_class(samples: int = 2, scale: float = 1.0
                         ) -> tuple[LinearModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """5 classes ranked 0 > 1 > 2 > 3 > 4 on the clean (zero) input, class 0 right; only class 3's
    logit depends on the input (+-0.125 per sample of one 64-sample lead, the sign alternating
    so that no constant offset moves it): an L-inf eps of 0.5 can lift it to 4, above class 0's
    3, and no other class can be reached. ``scale`` multiplies the logits."""
    weight = torch.zeros(5, 1, 64)
    weight[3] = 0.125 * scale * (-1.0) ** torch.arange(64)
    model = LinearModel(weight, scale * torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0]))
    return model, torch.zeros(samples, 1, 64), torch.zeros(samples, dtype=torch.long), torch.ones(samples, 1, 64)


def test_apgd_t_aims_at_the_top_other_classes_in_turn_and_stops_at_the_first_break():
    model, x, y, mask = _one_reachable_class()

    def attack(eps, targets, recorder=None):
        return autoattack.apgd_attack(recorder or model, x, y, mask, eps, steps=5, loss="dlr_targeted",
                                      target_classes=targets, generator=generator())

    # Classes 1 and 2 are the first two targets: aiming at them never lifts class 3.
    assert (predictions(model, attack(0.5, 2), mask) == 0).all()
    assert (predictions(model, attack(0.5, 3), mask) == 3).all()  # the third target, class 3
    passes = {}
    for targets in (3, 4, None):
        recorder = RecordingModel(model)
        attack(0.5 if targets else 0.01, targets, recorder)
        passes[targets] = len(recorder.iterates)
    # Broken at the third target: the fourth never runs. Unbreakable at eps 0.01: every target
    # (classes - 1 = 4 by default) runs its start and 5 steps.
    assert passes[4] == passes[3] and passes[None] == 4 * (5 + 1)


def test_apgd_t_refuses_too_few_classes_or_targets():
    model, x, y, mask = _one_reachable_class()
    with pytest.raises(ValueError, match="target_classes must be 1 to 4"):
        autoattack.apgd_attack(model, x, y, mask, 0.1, loss="dlr_targeted", target_classes=5)
    with pytest.raises(ValueError, match="only with loss='dlr_targeted'"):
        autoattack.apgd_attack(model, x, y, mask, 0.1, loss="ce", target_classes=2)
    three, x3, y3, mask3 = binary_linear_problem([64, 40])
    three = LinearModel(torch.randn(3, 2, 64))
    with pytest.raises(ValueError, match="needs at least 4 classes, the model has 3"):
        autoattack.apgd_attack(three, x3, y3, mask3, 0.1, loss="dlr_targeted")


def test_standard_ensemble_breaks_with_apgd_t_what_the_fast_one_misses():
    # Logits 100 times larger: the cross-entropy saturates (class 3's softmax weight underflows,
    # its input gradient is exactly 0), the untargeted DLR loss does not see class 3 (4th of the
    # top logits), and Square's margin only moves once class 3 passes class 1, which its
    # constant-sign windows on an alternating weight do not do. Only the targeted DLR loss aimed
    # at class 3 (scale-free, like every DLR loss) lifts it.
    model, x, y, mask = _one_reachable_class(4, scale=100.0)
    kept, fast = autoattack.ensemble_attack(model, x, y, mask, 0.5, version="fast", steps=5, queries=20,
                                            generator=generator())
    assert fast == [""] * 4 and (predictions(model, kept, mask) == 0).all()
    x_adv, broken_by = autoattack.ensemble_attack(model, x, y, mask, 0.5, steps=5, queries=20,
                                                  generator=generator())
    assert broken_by == ["apgd-t"] * 4 and (predictions(model, x_adv, mask) == 3).all()
    assert autoattack.ENSEMBLE_VERSIONS["standard"] == ("apgd-ce", "apgd-t", "square")
    assert autoattack.SQUARE_QUERIES == {"standard": 5000, "fast": 1000}
    with pytest.raises(ValueError, match="version 'plus' is not one of"):
        autoattack.ensemble_attack(model, x, y, mask, 0.5, version="plus")


# ----------------------------------------------------------------------------- AutoAttack's checks

class _Softmax(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, mask):
        return self.model(x, mask).softmax(dim=1)


class _Noisy(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x, mask):
        return self.model(x + 0.01 * torch.randn_like(x), mask)


def test_model_checks_flag_randomized_probability_and_zero_gradient_models(trained_tiny):
    model, x, y, mask = trained_tiny
    x, y, mask = x[:8], y[:8], mask[:8]
    assert autoattack.model_checks(model, x, y, mask) == {"randomized": 0, "probabilities": 0,
                                                          "zero_gradients": 0, "n": 8}
    assert autoattack.model_checks(_Noisy(model), x, y, mask)["randomized"] == 1
    assert autoattack.model_checks(_Softmax(model), x, y, mask)["probabilities"] == 1
    assert autoattack.model_checks(QuantizedInput(model), x, y, mask)["zero_gradients"] == 8
    assert autoattack.check_warnings({"randomized": 0, "probabilities": 0, "zero_gradients": 0, "n": 8}, 0) == []
    words = autoattack.check_warnings({"randomized": 1, "probabilities": 1, "zero_gradients": 8, "n": 8}, 3)
    assert len(words) == 4 and "EOT" in words[0] and "logits" in words[1]
    assert words[2].startswith("8 of 8 records have an input gradient that is zero")
    assert words[3].startswith("Square, which uses no gradients, broke 3 records")


# ----------------------------------------------------------------------------- against ART

class FullMaskModel(nn.Module):
    """ART calls model(x) on (B, *input_shape): reshape to (B, leads, T), full mask."""

    def __init__(self, model: nn.Module, leads: int, length: int):
        super().__init__()
        self.model, self.leads, self.length = model, leads, length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.leads, self.length)
        return self.model(x, torch.ones(x.shape[0], 1, self.length, dtype=x.dtype))


# 225 = 15 x 15 samples: ART's Square only takes images, so it sees each lead as a 15 x 15
# image (a length with no common factor with the task's periods 8, 16 and 32).
ART_LENGTH, ART_SIDE, ART_RECORDS = 225, 15, 48
ART_TOLERANCE = 3  # samples of 48: the random starts and windows of the two libraries differ


@pytest.fixture(scope="module")
def art_case(trained_tiny):
    model = trained_tiny[0]
    x, y, _ = sinusoid_task(ART_RECORDS, total=ART_LENGTH, seed=3)
    full = torch.ones(ART_RECORDS, 1, ART_LENGTH)

    def classifier(input_shape):
        return PyTorchClassifier(FullMaskModel(model, 2, ART_LENGTH), loss=nn.CrossEntropyLoss(),
                                 input_shape=input_shape, nb_classes=3, clip_values=(-1.0, 1.0))

    return classifier, model, x, y, full


def broken_counts(model, x, y, full, ours, theirs) -> dict[str, int]:
    counts = {name: int((predictions(model, inputs, full) != y).sum())
              for name, inputs in [("ours", ours), ("art", theirs)]}
    print(f"broken of {len(y)}: {counts}")
    assert 0 < counts["art"] < len(y) and 0 < counts["ours"] < len(y), counts  # not vacuous
    return counts


@pytest.mark.parametrize("loss, art_loss", [("ce", "cross_entropy"), ("dlr", "difference_logits_ratio")])
def test_apgd_breaks_as_many_as_art(art_case, loss, art_loss):
    classifier, model, x, y, full = art_case

    eps, steps = 0.15, 20
    np.random.seed(0)  # ART draws its random start from numpy's global RNG
    theirs = AutoProjectedGradientDescent(
        classifier((2, ART_LENGTH)), norm=np.inf, eps=eps, eps_step=2 * eps, max_iter=steps,
        nb_random_init=1, batch_size=ART_RECORDS, loss_type=art_loss, verbose=False
    ).generate(x.numpy(), y=y.numpy())
    ours = autoattack.apgd_attack(model, x, y, full, eps, steps=steps, loss=loss, generator=generator())
    counts = broken_counts(model, x, y, full, ours, torch.from_numpy(theirs))
    assert counts["ours"] >= counts["art"] - ART_TOLERANCE, counts


def test_square_breaks_as_many_as_art(art_case):
    classifier, model, x, y, full = art_case

    eps, queries = 0.2, 100
    np.random.seed(0)
    theirs = SquareAttack(classifier((2, ART_SIDE, ART_SIDE)), norm=np.inf, max_iter=queries, eps=eps,
                          p_init=0.8, nb_restarts=1, batch_size=ART_RECORDS, verbose=False
                          ).generate(x.reshape(ART_RECORDS, 2, ART_SIDE, ART_SIDE).numpy(), y=y.numpy())
    ours = autoattack.square_attack(model, x, y, full, eps, queries=queries, generator=generator())
    counts = broken_counts(model, x, y, full, ours,
                           torch.from_numpy(theirs).reshape(ART_RECORDS, 2, ART_LENGTH))
    assert counts["ours"] >= counts["art"] - ART_TOLERANCE, counts


# ----------------------------------------------------------------------------- gradient masking

class QuantizedInput(nn.Module):
    """The model on its input rounded to steps of 1/64: same predictions as the model up to
    the rounding, but torch.round has a zero gradient, so every input gradient is zero."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(torch.round(x * 64) / 64, mask)


def test_masked_gradients_fool_pgd_but_not_the_ensemble(trained_tiny):
    model, x, y, mask = trained_tiny
    masked = QuantizedInput(model)
    eps = 0.2

    def accuracy(inputs):
        return class_balanced_accuracy(confusion_matrix(y.numpy(), predictions(masked, inputs, mask).numpy(), 3))

    x_pgd = attacks.pgd_attack(masked, x, y, mask, eps, steps=10, generator=generator())
    x_ens, broken_by = autoattack.ensemble_attack(masked, x, y, mask, eps, version="fast", steps=10, queries=200,
                                                  generator=generator())
    x_square = autoattack.square_attack(masked, x, y, mask, eps, queries=200, generator=generator())
    clean, pgd, ensemble, square = accuracy(x), accuracy(x_pgd), accuracy(x_ens), accuracy(x_square)
    print(f"masked-gradient model at eps {eps}: accuracy clean {clean:.3f}, PGD {pgd:.3f}, "
          f"ensemble {ensemble:.3f}, Square {square:.3f}; broken by {sorted(set(broken_by))}")
    assert pgd >= clean - 0.05, "PGD should be stuck at its random start"
    assert ensemble < pgd - 0.1 and square < pgd - 0.1
    assert "square" in broken_by

    def sweep(acc):  # a one-level sweep result as robustness_sweep writes it
        return {"levels": [0.0, eps], "accuracy": [clean, acc], "n": len(y)}

    check = masking_check({"pgd_linf": sweep(pgd), "autoattack": sweep(ensemble), "square": sweep(square)})
    assert check["flagged"] and "PGD overstates this model's robustness by" in check["verdict"]
    assert "Square, which uses no gradients, does better" in check["verdict"]
    assert check["rows"][0]["gap"] == pytest.approx(pgd - ensemble)
