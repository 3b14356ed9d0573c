"""analysis/figures.py, drawing what it is given, and through evaluate.py's entry points: the
figures are written, and the data they plot is checked against the cache, scikit-learn and the
models themselves."""
import errno
import json

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sklearn_confusion_matrix

import attacks
import evaluate
from analysis import figures
from databases.cpsc2018 import CLASSES, LEAD_NAMES
from ECG_Dataset import get_dataloaders
from helpers import TINY_MAX_LENGTH, TINY_RANDOM_PAD, file_size_limit
from plumbing.distributed import choose_device
from preprocess import load_cache

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EPS = 0.05
JSON_TOLERANCE = 1e-6  # the JSON rounds to 6 decimals
SEEDS = {"A": 1, "B": 0}  # run: the seed of its weights and PGD starts (A, always attacked: not 0)


def assert_png(path):
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 1000, path


def split_loader(data_dir, batch_size=18):
    return get_dataloaders(str(data_dir), eval_batch_size=batch_size, max_length=TINY_MAX_LENGTH,
                           random_pad=TINY_RANDOM_PAD, splits=("test",))["test"]


@torch.no_grad()
def split_predictions(model, loader) -> tuple[np.ndarray, np.ndarray]:
    truths, predictions = zip(*((y, model(x, mask).argmax(dim=1)) for x, y, mask in loader))
    return torch.cat(truths).numpy(), torch.cat(predictions).numpy()


@pytest.fixture(scope="module")
def runs(untrained_run, tmp_path_factory):
    """Runs A and B (untrained resnet18a's of seeds 0 and 1) with a 3-step, 2-start PGD, each
    evaluated clean by the command line."""
    root = tmp_path_factory.mktemp("figure_runs")
    for name, seed in SEEDS.items():
        untrained_run(root / name, seed, "--sweeps", "", "--sweep_steps", "3", "--sweep_restarts", "2")
        assert evaluate.main([str(root / name)]) == 0
    return root


def test_evaluate_writes_the_confusion_heatmap_of_the_models_predictions(runs, tiny_cache):
    for name in ("A", "B"):
        assert_png(runs / name / "confusion_test.png")
        model, _ = evaluate.load_model(runs / name)
        truths, predictions = split_predictions(model.eval(), split_loader(tiny_cache))
        drawn = json.loads((runs / name / "eval_test.json").read_text())["clean"]["confusion_matrix"]
        np.testing.assert_array_equal(drawn, sklearn_confusion_matrix(truths, predictions, labels=range(9)))


def test_compare_writes_the_adversarial_example_within_eps_and_the_mask(runs, tiny_cache, tmp_path):
    out = tmp_path / "compare"
    assert evaluate.main(["compare", str(runs / "A"), str(runs / "B"), "--out", str(out),
                          "--example_eps", str(EPS)]) == 0
    assert_png(out / "adversarial_example.png")
    example = json.loads((out / "adversarial_example.json").read_text())
    assert example["eps"] == EPS and example["leads"] == list(evaluate.EXAMPLE_LEADS)
    assert list(example["runs"]) == ["A", "B"]

    # The record: the first of the split that both models classify correctly, else A's first.
    loader = split_loader(tiny_cache)
    models = {name: evaluate.load_model(runs / name)[0].eval() for name in ("A", "B")}
    truths, predictions = zip(*(split_predictions(model, loader) for model in models.values()))
    correct = np.stack([p == truths[0] for p in predictions])
    if correct.all(axis=0).any():
        index, selection = int(np.flatnonzero(correct.all(axis=0))[0]), "correctly classified by every run"
    else:
        index, selection = int(np.flatnonzero(correct[0])[0]), "the first correct for A"
    assert example["record"] == loader.dataset.names[index] and selection in example["selection"]

    # The clean leads: the cached mV signal over its lead's peak, right-aligned in the padding.
    cache = load_cache(tiny_cache)
    mask = np.asarray(example["mask"])
    clean = np.asarray(example["clean"])
    length = min(len(cache.signal(example["record"])[0]), TINY_MAX_LENGTH)
    assert mask.tolist() == [0] * (TINY_MAX_LENGTH + TINY_RANDOM_PAD - length) + [1] * length
    for lead, trace in zip(example["leads"], clean):
        millivolts = cache.signal(example["record"])[LEAD_NAMES.index(lead), :length].astype(np.float64)
        np.testing.assert_allclose(trace[mask == 1], millivolts / np.abs(millivolts).max(), atol=JSON_TOLERANCE)
        assert not trace[mask == 0].any()

    device = choose_device("auto")  # where evaluate.adversarial_example attacks
    x, y, x_mask = (t.unsqueeze(0).to(device) for t in loader.dataset[index])
    for name, model in models.items():
        model.to(device)
        run = example["runs"][name]
        adversarial = np.asarray(run["adversarial"])
        perturbation = adversarial - clean
        assert np.abs(perturbation[:, mask == 1]).max() <= EPS + JSON_TOLERANCE
        assert not perturbation[:, mask == 0].any()  # exactly zero on the padding
        assert np.abs(adversarial).max() <= 1  # PGD clips to [-1, 1]
        # The predictions: the model's own on the record and on the attack's output (the
        # pgd_linf sweep's settings, the run's seed), whose plotted leads the JSON holds.
        x_adv = attacks.pgd_attack(model, x, y, x_mask, EPS, "inf", steps=3, restarts=2,
                                   generator=torch.Generator(device=device).manual_seed(SEEDS[name]))
        np.testing.assert_allclose(adversarial, x_adv[0, example["lead_channels"]].cpu().numpy(),
                                   atol=JSON_TOLERANCE)
        with torch.no_grad():
            assert run["predicted_clean"] == CLASSES[predictions[list(models).index(name)][index]]
            assert run["predicted_adversarial"] == CLASSES[int(model(x_adv, x_mask).argmax())]


def test_compare_notes_runs_without_checkpoints_and_draws_nothing_at_eps_0(runs, tmp_path, capsys, fake_run):
    fakes = [fake_run(tmp_path / "A"), fake_run(tmp_path / "B")]
    (tmp_path / "out").mkdir()
    stale = ["adversarial_example.png", "adversarial_example.json", "masking_check.md", "pgd_l2_f1.csv"]
    for name in stale:  # an earlier compare's, which this one does not write
        (tmp_path / "out" / name).write_text("")
    assert evaluate.main(["compare", *map(str, fakes), "--out", str(tmp_path / "out")]) == 0
    assert not any((tmp_path / "out" / name).exists() for name in stale)
    assert "note: no adversarial example figure (" in capsys.readouterr().err
    assert (tmp_path / "out" / "clean.md").is_file()
    assert evaluate.main(["compare", str(runs / "A"), "--out", str(tmp_path / "zero"), "--example_eps", "0"]) == 0
    assert not (tmp_path / "zero" / "adversarial_example.png").exists()


@pytest.mark.parametrize("eps", ["-0.1", "nan", "inf"])
def test_a_bad_example_eps_is_refused_in_one_line(runs, tmp_path, eps, one_error_line):
    assert evaluate.main(["compare", str(runs / "A"), "--out", str(tmp_path), "--example_eps", eps]) == 2
    assert one_error_line() == f"error: --example_eps must be a finite number >= 0, got {float(eps)}"


def test_the_adversarial_example_is_drawn_from_the_arrays_it_is_given(tmp_path, monkeypatch):
    """No model and no data: the figure plots the example's arrays over the mask's span, at most
    STRIP_SECONDS of it, and the perturbation as their difference."""
    fs, padding, length = 500, 300, (figures.STRIP_SECONDS + 2) * 500  # longer than a strip
    rng = np.random.default_rng(0)
    clean = np.zeros((2, padding + length), np.float32)
    clean[:, padding:] = rng.uniform(-1, 1, (2, length))
    adversarial = clean + np.float32(0.05) * np.sign(clean)
    example = {"record": "A0001", "split": "test", "true_class": "AF", "selection": "chosen", "eps": 0.05,
               "fs": fs, "unit": "scaled", "leads": ["II", "V1"], "mask": [0] * padding + [1] * length,
               "clean": clean, "runs": {"CE": {"steps": 3, "restarts": 2, "predicted_clean": "AF",
                                                "predicted_adversarial": "Normal", "adversarial": adversarial}}}
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig))
    figures.adversarial_example_figure(example, tmp_path / "example.png")
    axes = drawn[0].axes  # lead II, lead V1, the perturbation (one run: one column)
    shown = slice(padding, padding + figures.STRIP_SECONDS * fs)
    for row, ax in enumerate(axes[:2]):
        clean_line, adversarial_line = ax.get_lines()
        np.testing.assert_array_equal(clean_line.get_ydata(), clean[row, shown])
        np.testing.assert_array_equal(adversarial_line.get_ydata(), adversarial[row, shown])
        assert clean_line.get_xdata()[-1] == pytest.approx(figures.STRIP_SECONDS - 1 / fs)
    for row, line in enumerate(axes[2].get_lines()[:2]):
        np.testing.assert_array_equal(line.get_ydata(), (adversarial - clean)[row, shown])
    assert "fooled" in axes[0].get_title() and "first 10 s of 12.0 s" in drawn[0].get_suptitle()
    figures.plt.close(drawn[0])


HISTORY = [{"epoch": 0, "loss": 2.0, "val_accuracy": 0.2}, {"epoch": 1, "loss": 1.5, "val_accuracy": 0.4}]


def test_the_curves_show_a_guarded_runs_guard_accuracy_beside_the_validation_accuracy(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "save_figure", lambda fig, path: drawn.append(fig))
    figures.training_curves_figure(HISTORY, tmp_path / "curves.png", "CE")
    assert len(drawn[0].axes[1].get_lines()) == 1  # no guard, no guard line
    guarded = [{**HISTORY[0], "guard_accuracy": None}, {**HISTORY[1], "guard_accuracy": 0.25}]
    figures.training_curves_figure(guarded, tmp_path / "curves.png", "fast_adv")
    validation, guard = drawn[1].axes[1].get_lines()
    np.testing.assert_array_equal(validation.get_ydata(), [0.2, 0.4])
    np.testing.assert_array_equal(guard.get_ydata(), [np.nan, 0.25])
    assert "guard" in guard.get_label()
    for fig in drawn:
        figures.plt.close(fig)


def test_a_figure_replaces_a_link_in_its_place_and_leaves_the_target_alone(tmp_path):
    target, figure = tmp_path / "elsewhere.txt", tmp_path / "run" / "curves.png"
    target.write_text("not the run's")
    figure.parent.mkdir()
    figure.symlink_to(target)
    figures.training_curves_figure(HISTORY, figure, "CE")
    assert not figure.is_symlink() and target.read_text() == "not the run's"
    assert_png(figure)


def test_a_failed_figure_write_names_the_file_and_keeps_the_previous_figure(tmp_path):
    figure = tmp_path / "curves.png"
    figures.training_curves_figure(HISTORY[:1], figure, "CE")
    previous = figure.read_bytes()
    with file_size_limit(1000), pytest.raises(OSError, match=str(figure)) as error:
        figures.training_curves_figure(HISTORY, figure, "CE")
    assert error.value.errno == errno.EFBIG
    assert figure.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
