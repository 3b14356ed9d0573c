"""certify.py: randomized smoothing checked against independent computations (a brute-force
binomial tail, a linear model whose exact robust radius is known), and the command line."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

import certify
import evaluate
from analysis.metrics import certified_accuracy
from databases.cpsc2018 import CLASSES
from helpers import LinearModel, generator, right_aligned_masks


def binomial_tail(successes: int, trials: int, p: float) -> float:
    """P(X >= successes) for X ~ Binomial(trials, p), the sum of its terms."""
    return sum(math.comb(trials, j) * p ** j * (1 - p) ** (trials - j) for j in range(successes, trials + 1))


def brute_force_lower_bound(successes: int, trials: int, alpha: float) -> float:
    """The one-sided Clopper-Pearson lower bound by its definition: the p at which seeing at least
    ``successes`` has probability alpha (the tail rises with p), found by bisection."""
    if successes == 0:
        return 0.0
    low, high = 0.0, 1.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if binomial_tail(successes, trials, middle) < alpha else (low, middle)
    return (low + high) / 2


@pytest.mark.parametrize("trials, alpha", [(20, 0.001), (50, 0.05), (100, 0.001)])
def test_the_clopper_pearson_bound_is_the_binomial_tails(trials, alpha):
    counts = [0, 1, trials // 3, trials // 2, trials - 1, trials]
    bounds = certify.lower_confidence_bound(counts, trials, alpha)
    expected = [brute_force_lower_bound(k, trials, alpha) for k in counts]
    assert bounds == pytest.approx(expected, abs=1e-9)
    assert bounds[0] == 0.0 and all(np.diff(bounds) > 0)


def linear_two_class_problem(records: int, total: int = 8, seed: int = 0):
    """(model, x, mask, exact radius, class): a linear 2-class model on 2 leads, margin
    s(x) = <w, x * mask> + b. Its smoothed classifier predicts sign(s) and, as the noise enters
    s as N(0, sigma^2 ||w * mask||^2), keeps it exactly within the distance to the hyperplane
    over the signal: |s| / ||w * mask||."""
    g = generator(seed)
    w = torch.randn(2, total, generator=g)
    model = LinearModel(torch.stack([torch.zeros_like(w), w]), torch.tensor([0.0, 0.1]))
    mask = right_aligned_masks(torch.randint(2, total + 1, (records,), generator=g).tolist(), total)
    x = 0.3 * torch.randn(records, 2, total, generator=g) * mask
    margin = torch.einsum("blt,lt->b", x * mask, w) + 0.1
    exact = (margin.abs() / (w * mask).flatten(1).norm(dim=1)).double()
    return model, x, mask, exact, (margin > 0).long()


def test_certified_radii_of_a_linear_model_are_sound_and_close_to_the_exact_radii():
    model, x, mask, exact, label = linear_two_class_problem(24)
    prediction, radius = certify.certify(model, x, mask, sigma=0.5, n0=100, n=100_000, alpha=0.001,
                                         batch_size=50_000, generator=generator(1))
    assert prediction.dtype == torch.int64 and radius.shape == (24,)
    certified = prediction != certify.ABSTAIN
    assert (prediction[certified] == label[certified]).all()
    assert (radius[~certified] == 0).all()
    ratio = radius[certified] / exact[certified]
    assert certified.sum() >= 20  # only records next to the hyperplane are abstained on
    assert ratio.max() <= 1  # sound: never beyond the exact radius
    assert ratio.median() > 0.95  # and close to it at n = 10^5


def test_abstention_rises_with_sigma_on_a_fixed_model():
    """On the linear model P(the smoothed class) = Phi(exact radius / sigma) falls as sigma grows."""
    model, x, mask, _, _ = linear_two_class_problem(32)
    abstained = [int((certify.certify(model, x, mask, sigma, n0=10, n=1000, batch_size=1000,
                                      generator=generator(0))[0] == certify.ABSTAIN).sum())
                 for sigma in (0.05, 0.3, 1.0, 3.0)]
    assert abstained == sorted(abstained) and abstained[-1] > abstained[0] + 10, abstained


class NoiseRecorder(nn.Module):
    """A constant-class model that keeps every input and mask it is given."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, mask):
        self.calls.append((x.clone(), mask.clone()))
        return torch.zeros(len(x), 3)


def test_the_noise_is_on_the_signal_only_in_batches_of_noisy_copies():
    recorder = NoiseRecorder()
    mask = right_aligned_masks([10, 32], 32)
    x = torch.rand(2, 2, 32) * mask
    counts = certify.noise_counts(recorder, x, mask, 0.5, 70, batch_size=32, generator=generator(0))
    assert counts.tolist() == [[70, 0, 0], [70, 0, 0]]
    assert [len(inputs) for inputs, _ in recorder.calls] == [32, 32, 6] * 2
    noise = torch.cat([inputs - x[i] for i, (inputs, _) in zip([0, 0, 0, 1, 1, 1], recorder.calls)])
    signal = torch.cat([masks for _, masks in recorder.calls]).expand_as(noise).bool()
    assert (noise[~signal] == 0).all()  # the padding stays zero
    assert noise[signal].std().item() == pytest.approx(0.5, rel=0.05)


def two_sided_p_value(count1: int, count2: int) -> float:
    """The two-sided binomial test of count1 of count1 + count2 against 1/2 (count1 >= count2)."""
    return min(1.0, 2 * binomial_tail(count1, count1 + count2, 0.5))


def test_certify_abstains_below_a_lower_bound_of_one_half_and_certifies_radius_zero_at_it(monkeypatch):
    counts = torch.tensor([[0, 9, 1], [8, 2, 0], [0, 3, 7]])
    monkeypatch.setattr(certify, "noise_counts", lambda *args: counts)
    monkeypatch.setattr(certify, "lower_confidence_bound", lambda *args: np.array([0.5, 0.4999, 0.8]))
    predicted, radius = certify.certify(nn.Identity(), torch.zeros(3, 1, 8), torch.ones(3, 1, 8), 0.25, 10, 10)
    assert predicted.tolist() == [1, certify.ABSTAIN, 2]
    assert radius.tolist() == [0.0, 0.0, pytest.approx(0.25 * 0.8416212335729143)]  # sigma Phi^-1(0.8)


def test_predict_abstains_exactly_when_the_binomial_test_is_not_significant(monkeypatch):
    counts = torch.tensor([[60, 40, 0], [0, 30, 70], [5, 52, 48], [90, 0, 10], [50, 50, 0]])
    monkeypatch.setattr(certify, "noise_counts", lambda *args: counts)
    predicted = certify.predict(nn.Identity(), torch.zeros(5, 1, 8), torch.ones(5, 1, 8), 0.25, n=100, alpha=0.05)
    expected = []
    for row in counts.tolist():
        count1, count2 = sorted(row, reverse=True)[:2]
        expected.append(row.index(count1) if two_sided_p_value(count1, count2) <= 0.05 else certify.ABSTAIN)
    assert predicted.tolist() == expected == [certify.ABSTAIN, 2, certify.ABSTAIN, 0, certify.ABSTAIN]


def test_certified_accuracy_counts_correct_records_at_or_beyond_each_radius():
    assert certified_accuracy([0.0, 0.3, 1.2, 2.0], [False, True, True, False], [0, 0.3, 0.5, 1.5]) == \
        [0.5, 0.5, 0.25, 0.0]


def test_the_command_certifies_a_class_balanced_subset_and_writes_its_results(tmp_path, untrained_run, capsys):
    run = untrained_run(tmp_path / "run")
    argv = [str(run), "--sigma", "0.5", "--n0", "2", "--n", "6", "--batch_size", "4", "--max_records", "3",
            "--alpha", "0.2", "--device", "cpu"]
    assert certify.main(argv) == 0
    result = json.loads((run / "certify_0.5.json").read_text())
    assert result["settings"] == {"sigma": 0.5, "n0": 2, "n": 6, "alpha": 0.2, "batch_size": 4, "max_records": 3,
                                  "seed": 0, "split": "test", "device": "cpu",
                                  "data_dir": evaluate.load_model(run)[1]["data_dir"]}
    records = result["records"]
    assert sorted(r["label"] for r in records) == sorted(CLASSES[:3])  # one record of each of the first classes
    table = pd.read_csv(run / "certify_0.5.csv")
    assert list(table["record"]) == [r["record"] for r in records]
    assert list(table.columns) == ["record", "label", "prediction", "radius", "correct", "seconds"]
    for row in records:  # radius 0 exactly when abstaining; correct: the smoothed prediction is the label
        assert (row["prediction"] == "abstain") == (row["radius"] == 0)
        assert row["correct"] == (row["prediction"] == row["label"])
    assert result["certified_accuracy"]["accuracy"] == certified_accuracy(
        [r["radius"] for r in records], [r["correct"] for r in records], certify.CERTIFIED_RADII)
    assert (run / "certify_0.5.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "certified accuracy on the test split (3 records, sigma 0.5" in out and "radius" in out


@pytest.mark.parametrize("flags, message", [
    (["--sigma", "0"], "--sigma must be a positive finite number, got 0.0"),
    (["--sigma", "-1"], "--sigma must be a positive finite number, got -1.0"),
    (["--sigma", "nan"], "--sigma must be a positive finite number, got nan"),
    (["--n0", "0"], "--n0 must be at least 1, got 0"),
    (["--n0", "10", "--n", "5"], "--n must be at least --n0 (10), got 5"),
    (["--alpha", "0"], "--alpha must lie strictly between 0 and 1, got 0.0"),
    (["--alpha", "1"], "--alpha must lie strictly between 0 and 1, got 1.0"),
    (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    (["--max_records", "-1"], "--max_records must be >= 0, got -1"),
    (["--sigm", "0.1"], "unrecognized arguments: --sigm 0.1"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, one_error_line, flags, message):
    assert certify.main([str(tmp_path), *flags]) == 2
    assert one_error_line() == f"error: {message}"


def test_a_run_folder_without_a_model_is_refused_in_one_line(tmp_path, one_error_line):
    assert certify.main([str(tmp_path), "--n0", "5", "--n", "10"]) == 2
    assert one_error_line() == f"error: {tmp_path / 'model.pt'}: no such checkpoint (train the run first)"
    assert not any(tmp_path.iterdir())  # nothing written
