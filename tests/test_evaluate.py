import errno
import json
import os
import resource
import shutil

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

import config
import evaluate
from analysis.metrics import classification_scores
from databases.cpsc2018 import CLASSES
from ECG_Dataset import get_dataloaders
from helpers import TINY_MAX_LENGTH, TINY_RANDOM_PAD, LinearModel
from plumbing.safe_writes import lock_folder


# --- the command line: runs, checkpoints, sweeps --------------------------------------------

def test_evaluate_cli_reevaluates_a_run_on_validation(two_runs):
    assert evaluate.main([str(two_runs / "A"), "--split", "val", "--sweeps", "muscle,powerline_50hz",
                          "--sweep_max_batches", "1"]) == 0
    result = json.loads((two_runs / "A" / "robustness_val.json").read_text())
    assert set(result["sweeps"]) == {"muscle", "powerline_50hz"}
    assert result["sweeps"]["muscle"]["levels"][0] is None  # clean = infinite SNR
    assert json.loads((two_runs / "A" / "eval_val.json").read_text())["clean"]["n"] == 9


@pytest.mark.parametrize("make_args,message", [
    (lambda runs, tmp: [str(tmp / "missing")], "no such checkpoint"),
    (lambda runs, tmp: [str(runs / "A"), "--sweeps", "pgd_l3"], "unknown sweep 'pgd_l3'"),
    (lambda runs, tmp: [str(runs / "A"), "--sweep_steps", "-1"], "--sweep_steps must be >= 0"),
    (lambda runs, tmp: [str(runs / "A"), "--sweep-restarts", "0"], "--sweep_restarts must be at least 1, got 0"),
    (lambda runs, tmp: [str(runs / "A"), "--levels", "huge"],
     "--levels: unknown level list 'huge' (known: paper, extended)"),
    (lambda runs, tmp: [str(tmp / "foreign.pt")], "not a checkpoint of this project"),
    (lambda runs, tmp: [str(tmp / "truncated.pt")], "not a checkpoint of this project"),
    (lambda runs, tmp: [str(tmp / "no_settings.pt")], "not a checkpoint of this project (its config lacks "),
    (lambda runs, tmp: ["compare", str(tmp)], "eval_test.json: not found"),
])
def test_evaluate_cli_bad_inputs_give_one_line(two_runs, tmp_path, capsys, make_args, message):
    torch.save({"model_name": "resnet18a", "model": {"w": torch.zeros(1)}, "config": {}}, tmp_path / "foreign.pt")
    (tmp_path / "truncated.pt").write_bytes((two_runs / "A" / "model.pt").read_bytes()[:500])
    state = torch.load(two_runs / "A" / "model.pt", weights_only=True)
    torch.save({**state, "config": {}}, tmp_path / "no_settings.pt")
    assert evaluate.main(make_args(two_runs, tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_a_file_that_cannot_be_written_ends_the_evaluation_in_one_line_with_status_1(two_runs, monkeypatch,
                                                                                     one_error_line):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", "eval_test.json")

    monkeypatch.setattr(evaluate, "evaluate_run", disk_full)
    assert evaluate.main([str(two_runs / "A")]) == 1
    assert one_error_line() == "error: [Errno 28] No space left on device: 'eval_test.json'"


def test_a_pickled_object_in_a_checkpoint_is_never_executed(tmp_path, capsys):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"model_name": "resnet18a", "model": Exploit(), "config": {}}, tmp_path / "evil.pt")
    assert evaluate.main([str(tmp_path / "evil.pt")]) == 2
    assert not marker.exists()
    assert "not a checkpoint of this project" in capsys.readouterr().err


# --- bad checkpoints that need no trained run ------------------------------------------------

def test_a_checkpoint_without_its_config_is_refused_in_one_line(tmp_path, untrained_run, one_error_line):
    path = untrained_run(tmp_path) / "model.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]
    torch.save(state, path)
    assert evaluate.main([str(path)]) == 2
    assert one_error_line() == f"error: {path}: not a checkpoint of this project (KeyError: 'config')"


@pytest.fixture(scope="module")
def saved_state(untrained_run, tmp_path_factory) -> dict:
    """What model.pt of conftest's untrained_run holds: model_name, model (weights) and config."""
    return torch.load(untrained_run(tmp_path_factory.mktemp("saved") / "CE") / "model.pt", weights_only=True)


def first_weight_halved(weights: dict) -> dict:
    name = next(iter(weights))
    return {**weights, name: weights[name][: len(weights[name]) // 2]}


@pytest.mark.parametrize("change,message", [
    (dict(eval_batch_size=0), "its saved eval_batch_size is 0, below the least a training saves (1)"),
    (dict(max_length=-5), "its saved max_length is -5, below the least a training saves (1)"),
    (dict(max_length="abc"), "its saved max_length is 'abc', not a whole number"),
    (dict(batch_size=8.0), "its saved batch_size is 8.0, not a whole number"),
    (dict(seed=True), "its saved seed is True, not a whole number"),
    (dict(seed=2**32, sweeps="white"), "its saved seed is 4294967296, above the most a training saves (4294967295)"),
    (dict(seed=2**64), "its saved seed is 18446744073709551616, above the most a training saves (4294967295)"),
    (dict(bucket="yes"), "its saved bucket is 'yes', not true or false"),
    (dict(data_dir=5), "its saved data_dir is 5, not a string"),
    (dict(sweeps="pgd_l3"), "its saved settings cannot be evaluated (--sweeps: unknown sweep 'pgd_l3'"),
    (dict(levels="huge"), "its saved settings cannot be evaluated (--levels: unknown level list 'huge'"),
    (dict(max_length=1000, random_pad=0), "its saved settings cannot be evaluated (input length 1000 is not "
                                          "supported"),
    ("config as a list", "not a checkpoint of this project (its config is not a dict)"),
    ("weights of the wrong shape", "not a checkpoint of this project (RuntimeError: Error(s) in loading "
                                   "state_dict for ResNet18A: size mismatch for "),
    ("a list, not a checkpoint", "not a checkpoint of this project (TypeError: "),
])
def test_a_malformed_checkpoint_is_refused_in_one_line_naming_it(tmp_path, saved_state, one_error_line, change,
                                                                 message):
    """Files that torch loads with weights_only=True but that no training of this project wrote."""
    state = {"config as a list": {**saved_state, "config": [saved_state["config"]]},
             "weights of the wrong shape": {**saved_state, "model": first_weight_halved(saved_state["model"])},
             "a list, not a checkpoint": [saved_state]}.get(change) if isinstance(change, str) \
        else {**saved_state, "config": {**saved_state["config"], **change}}
    torch.save(state, tmp_path / "bad.pt")
    assert evaluate.main([str(tmp_path / "bad.pt"), "--device", "cpu"]) == 2
    assert one_error_line().startswith(f"error: {tmp_path / 'bad.pt'}: {message}")
    assert not (tmp_path / "bad").exists()  # refused before its results folder was made


def test_a_checkpoint_file_without_a_suffix_or_with_a_file_in_the_way_is_refused_in_one_line(
        tmp_path, saved_state, one_error_line):
    """Its results folder would be the file itself (or that file): the refusal comes before any work."""
    torch.save(saved_state, tmp_path / "epoch_010")
    assert evaluate.main([str(tmp_path / "epoch_010"), "--device", "cpu"]) == 2
    assert one_error_line() == (f"error: {tmp_path / 'epoch_010'}: a checkpoint file without a suffix: its "
                                "results would go into a folder of the same name (the file's name without its "
                                "suffix); rename it to end in .pt")
    (tmp_path / "epoch_010").rename(tmp_path / "epoch_010.pt")
    (tmp_path / "epoch_010").write_text("notes")
    assert evaluate.main([str(tmp_path / "epoch_010.pt"), "--device", "cpu"]) == 2
    assert one_error_line() == (f"error: {tmp_path / 'epoch_010'}: a file, in the way of the folder that the "
                                "results of epoch_010.pt go into: move it away")
    assert (tmp_path / "epoch_010").read_text() == "notes"


@pytest.mark.parametrize("argv,flag", [(["RUN", "--data_dir", ""], "--data_dir/--data-dir"),
                                       (["compare", "RUN", "--out", " "], "--out")])
def test_an_empty_folder_flag_is_refused_in_one_line(tmp_path, monkeypatch, fake_run, one_error_line, argv, flag):
    monkeypatch.chdir(tmp_path)  # an empty path would mean this folder
    fake_run(tmp_path / "RUN")
    assert evaluate.main(argv) == 2
    assert one_error_line() == f"error: argument {flag}: an empty path names no folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RUN"]


def test_a_write_beyond_the_file_size_limit_names_the_file(tmp_path, untrained_run, monkeypatch, one_error_line):
    """ulimit -f: the kernel's error names no file; the message must."""
    run = untrained_run(tmp_path / "CE")
    monkeypatch.setattr(evaluate, "evaluate_clean", lambda *args: classification_scores(np.eye(9, dtype=int)))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))  # eval_test.json is larger
    try:
        status = evaluate.main([str(run), "--sweeps", "", "--device", "cpu"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 1
    assert one_error_line() == f"error: [Errno {errno.EFBIG}] File too large: '{run / 'eval_test.json'}'"
    assert sorted(p.name for p in run.iterdir()) == [".lock", "model.pt"]  # the partial file was removed


def test_an_unavailable_device_is_refused_in_one_line(tmp_path, untrained_run, one_error_line):
    path = untrained_run(tmp_path) / "model.pt"
    assert evaluate.main([str(path), "--device", "mps"]) == 2
    assert one_error_line() == "error: --device mps: MPS is not available on this machine"


def test_each_checkpoint_file_is_evaluated_into_its_own_folder_and_named_in_its_results(tmp_path, untrained_run):
    run = untrained_run(tmp_path / "CE")
    (run / "checkpoints").mkdir()
    for epoch in (1, 2):
        shutil.copy(run / "model.pt", run / "checkpoints" / f"epoch_00{epoch}.pt")
        assert evaluate.main([str(run / "checkpoints" / f"epoch_00{epoch}.pt"), "--sweeps", "", "--device", "cpu"]) == 0
    for epoch in (1, 2):
        result = json.loads((run / "checkpoints" / f"epoch_00{epoch}" / "eval_test.json").read_text())
        assert result["checkpoint"] == str(run / "checkpoints" / f"epoch_00{epoch}.pt")
    assert not (run / "eval_test.json").exists()  # the run's own results are those of its model.pt
    assert evaluate.main([str(run / "model.pt"), "--sweeps", "", "--device", "cpu"]) == 0
    assert json.loads((run / "eval_test.json").read_text())["checkpoint"] == str(run / "model.pt")


def test_a_run_folder_in_use_is_not_evaluated(tmp_path, untrained_run, one_error_line):
    untrained_run(tmp_path)
    with lock_folder(tmp_path):  # as a training of that run would
        assert evaluate.main([str(tmp_path)]) == 2
    assert f"this run folder is in use by process {os.getpid()}" in one_error_line()
    assert not (tmp_path / "eval_test.json").exists()


def test_flags_are_never_abbreviated(tmp_path, one_error_line):
    assert evaluate.main([str(tmp_path), "--sweep", "white"]) == 2
    assert one_error_line() == "error: unrecognized arguments: --sweep white"


# --- AutoAttack-style sweeps and the gradient-masking check ---------------------------------

def test_balanced_records_take_the_classes_in_turn():
    labels = [2, 0, 0, 1, 0, 2, 0, 1, 0]  # class 0: records 1 2 4 6 8; class 1: 3 7; class 2: 0 5
    # turns: 1 (class 0), 3 (1), 0 (2), then 2, 7, 5, then class 0 alone: 4, 6, 8
    assert evaluate.balanced_records(labels, 5) == [0, 1, 2, 3, 7]
    assert evaluate.balanced_records(labels, 7) == [0, 1, 2, 3, 4, 5, 7]
    assert evaluate.balanced_records(labels, 0) == list(range(9))
    assert evaluate.balanced_records(labels, 50) == list(range(9))


@pytest.mark.slow  # the AutoAttack-style sweeps
def test_autoattack_sweeps_on_a_record_subset_and_the_compare_check(two_runs, tmp_path):
    run = tmp_path / "B"  # a copy: the other tests read the fixture's own results
    shutil.copytree(two_runs / "B", run)
    assert evaluate.main([str(run), "--sweeps", "pgd_linf,autoattack,white", "--sweep_steps", "1",
                          "--sweep_restarts", "1", "--sweep_max_records", "3"]) == 0
    sweeps = json.loads((run / "robustness_test.json").read_text())["sweeps"]
    for name in ("pgd_linf", "autoattack"):
        assert sweeps[name]["n"] == 3 and sweeps[name]["settings"]["max_records"] == 3
        assert len(sweeps[name]["records"]) == 3
    assert sweeps["autoattack"]["records"] == sweeps["pgd_linf"]["records"]
    assert sweeps["white"]["n"] == 18 and "records" not in sweeps["white"]  # noises see every record
    assert sweeps["autoattack"]["levels"][1:] == [0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1]
    assert evaluate.main(["compare", str(run), "--out", str(tmp_path / "compare")]) == 0
    markdown = (tmp_path / "compare" / "masking_check.md").read_text()
    assert markdown.startswith("| run | eps | PGD | ensemble |") and "- **B**:" in markdown


class _WigglyIsAF(torch.nn.Module):
    """Predicts AF (1) when the leads vary over time, Normal (0) on a flat signal: any noise
    turns a flat record into AF."""

    def forward(self, x, mask):
        logits = torch.full((len(x), 9), -10.0)
        logits[:, 0] = 0.01
        logits[:, 1] = 1000 * x.std(dim=2).mean(dim=1)
        return logits


@pytest.mark.parametrize("sweep", ["white", "powerline_50hz"])
def test_noise_never_counts_a_wrong_record_right(sweep):
    """Pins fix 2 (the original's evaluation): the flat AF record is wrong on the clean input
    and stays wrong at every level, although the noise makes the model say AF; this code used to
    score it on its noisy prediction, so the accuracy under noise rose above the clean one."""
    x, mask = torch.full((2, 8, 500), 0.5), torch.ones(2, 1, 500)
    y = torch.tensor([0, 1])  # Normal (right when clean), AF (wrong when clean)
    result = evaluate.robustness_sweep(_WigglyIsAF(), [(x, y, mask)], sweep, torch.device("cpu"))
    assert result["accuracy"] == [0.5] + [0.0] * (len(result["levels"]) - 1)
    assert not result["envelope"] and "per_level" not in result  # noise is no attack: per level
    for cm in result["confusion_matrix"][1:]:  # AF keeps its clean prediction, Normal
        assert cm[1][0] == 1 and cm[0][1] == 1


class _FirstSample(torch.nn.Module):
    """Predicts the class written in each record's first sample (x[:, 0, 0])."""

    def forward(self, x, mask):
        return torch.nn.functional.one_hot(x[:, 0, 0].round().long(), 9).float()


# Record i (its id in x[i, 1, 0]) is broken at these levels only: an attack that finds record 0's
# adversarial input at 0.001 but not at the larger levels, and record 1's only at 0.03.
_BROKEN_AT = {0: {0.001}, 1: {0.03}, 2: set()}


def _fake_attack(calls):
    def perturb(model, x, y, mask, level, steps, restarts, generator):
        calls.append((level, x[:, 1, 0].long().tolist()))
        x = x.clone()
        for row, record in enumerate(x[:, 1, 0].long().tolist()):
            if level in _BROKEN_AT[record]:
                x[row, 0, 0] = (y[row] + 1) % 9
        return x
    return perturb


@pytest.mark.parametrize("per_level", [False, True])
def test_attack_sweeps_report_the_envelope_and_attack_only_the_survivors(monkeypatch, per_level):
    calls = []
    monkeypatch.setitem(evaluate.SWEEPS, "fake", config.Sweep("Fake", _fake_attack(calls), config.LINF_LEVELS,
                                                               "L-inf eps", str, attacks_model=True))
    y = torch.tensor([0, 1, 2])
    x = torch.zeros(3, 2, 16)
    x[:, 0, 0], x[:, 1, 0] = y.float(), torch.arange(3.0)
    result = evaluate.robustness_sweep(_FirstSample(), [(x, y, torch.ones(3, 1, 16))], "fake", torch.device("cpu"),
                                       per_level=per_level)
    right = [int(np.trace(cm)) for cm in result["confusion_matrix"]]
    # levels: clean, 0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1
    assert result["envelope"] and right == [3, 2, 2, 2, 2, 2, 1, 1, 1]
    assert result["accuracy"] == sorted(result["accuracy"], reverse=True)
    attacked = {level: records for level, records in calls}
    if per_level:  # every record at every level, and the paper's per-level numbers beside the envelope
        assert all(records == [0, 1, 2] for records in attacked.values()) and result["attacked"][1:] == [3] * 8
        assert [int(np.trace(cm)) for cm in result["per_level"]["confusion_matrix"]] == [3, 2, 3, 3, 3, 3, 2, 3, 3]
    else:  # record 0 is not attacked after 0.001, record 1 not after 0.03
        assert attacked[0.001] == [0, 1, 2] and attacked[0.003] == [1, 2] and attacked[0.05] == [2]
        assert result["attacked"] == [0, 3, 2, 2, 2, 2, 2, 1, 1] and "per_level" not in result


@pytest.mark.parametrize("per_level", [False, True])
def test_ensemble_sweeps_count_who_broke_each_record_and_run_autoattacks_checks(per_level):
    torch.manual_seed(0)
    model = LinearModel(torch.randn(9, 2, 32))
    x, mask = 0.1 * torch.randn(4, 2, 32), torch.ones(4, 1, 32)
    with torch.no_grad():
        y = model(x, mask).argmax(dim=1)
    result = evaluate.robustness_sweep(model, [(x, y, mask)], "autoattack", torch.device("cpu"), steps=2, restarts=1,
                                       per_level=per_level)
    assert result["ensemble_version"] == "standard" and list(result["broken_by"]) == ["apgd-ce", "apgd-t", "square"]
    broken = np.sum(list(result["broken_by"].values()), axis=0)  # per level
    # Each record is counted once, at the level that first broke it (also when every level attacks
    # every record): the envelope's correct records fall by the level's count.
    right = [int(np.trace(cm)) for cm in result["confusion_matrix"]]
    assert right[0] == 4 and list(broken[1:]) == [right[i - 1] - right[i] for i in range(1, 9)]
    assert broken.sum() == 4 - right[-1]
    if per_level:
        assert result["attacked"][1:] == [4] * 8
    else:  # each level attacks the records no lower level broke
        assert result["attacked"][1] == 4 and all(result["attacked"][i + 1] == result["attacked"][i] - broken[i]
                                                  for i in range(1, 8))
    assert result["checks"] == {"randomized": 0, "probabilities": 0, "zero_gradients": 0, "n": 4}
    assert (result["warnings"] == []) == (sum(result["broken_by"]["square"]) == 0)


def test_sweep_results_hold_f1_and_the_confusion_matrix_of_every_level(two_runs):
    """Each level's mean F1 is scikit-learn's macro F1 of the stored confusion matrix, and its
    accuracy the balanced accuracy; the AUCs follow from the curves; the level list is named."""
    result = json.loads((two_runs / "A" / "robustness_test.json").read_text())
    assert result["levels"] == "paper"
    for name, sweep in result["sweeps"].items():
        assert sweep["level_list"] == "paper"
        for cm, accuracy, f1 in zip(sweep["confusion_matrix"], sweep["accuracy"], sweep["mean_f1"], strict=True):
            cm = np.array(cm)
            y_true = np.repeat(np.repeat(np.arange(9), 9), cm.ravel())
            y_pred = np.repeat(np.tile(np.arange(9), 9), cm.ravel())
            assert f1 == pytest.approx(skm.f1_score(y_true, y_pred, labels=range(9), average="macro",
                                                    zero_division=0))
            assert accuracy == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
        assert sweep["auc_f1"] == pytest.approx(np.trapezoid(sweep["mean_f1"], sweep["axis_levels"])
                                                / sweep["axis_levels"][-1])


# --- the adversarial example of a comparison -------------------------------------------------

class ConstantModel(torch.nn.Module):
    """Predicts one class whatever the input."""

    def __init__(self, label: int):
        super().__init__()
        self.label = label

    def forward(self, x, mask):
        return torch.nn.functional.one_hot(torch.full((len(x),), self.label), len(CLASSES)).float()


def test_the_record_is_shared_by_every_run_when_one_exists(tiny_cache):
    loader = get_dataloaders(str(tiny_cache), eval_batch_size=4, max_length=TINY_MAX_LENGTH,
                             random_pad=TINY_RANDOM_PAD, splits=("test",))["test"]
    firsts = {int(label): int(np.flatnonzero(loader.dataset.labels == label)[0]) for label in range(9)}
    label = max(firsts, key=firsts.get)  # the class met last: its first record is past the first batch
    first, other = firsts[label], (label + 1) % 9
    assert first >= 4
    assert evaluate.choose_record({"A": ConstantModel(label), "B": ConstantModel(label)}, loader) == (
        first, "correctly classified by every run")
    index, selection = evaluate.choose_record({"A": ConstantModel(label), "B": ConstantModel(other)}, loader)
    assert index == first and "first correct for A" in selection
