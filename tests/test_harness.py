"""The shared training harness: a tiny run end to end, resume, signals, bad flags."""
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import config
from training import harness
from databases.cpsc2018 import DataError
from evaluate import load_model
from helpers import PAPER_TRAINING, REPO, run_script, script_with, weights
from plumbing.checkpoints import newest_checkpoint
from plumbing.run_folder import prepare_run_dir
from plumbing.safe_writes import LOCK_NAME, temporary_path
from preprocess import load_cache
from reproduce import SCRIPTS



def tiny_flags(cache, result_dir, *extra):
    return ["--data_dir", str(cache), "--result_dir", str(result_dir), "--max_length", "2048",
            "--random_pad", "1024", "--batch_size", "8", "--eval_batch_size", "18",
            "--sweeps", "", *extra]


def ce_loss(model, x, y, mask, epoch, cfg):
    return F.cross_entropy(model(x, mask), y), {}


CE_SCRIPT = script_with(SCRIPTS["CE"], loss_fn=ce_loss)


def train_ce(cache, result_dir, *extra, loss_fn=ce_loss):
    return harness.main(script_with(SCRIPTS["CE"], loss_fn=loss_fn), argv=tiny_flags(cache, result_dir, *extra))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def ce_run(tiny_cache, tmp_path_factory) -> Path:
    """The folder holding run CE of train_ce(tiny_cache, folder, "--epochs", "1"): trained once for
    the module; read-only (tests that change it take ce_run_copy)."""
    folder = tmp_path_factory.mktemp("ce_run")
    assert train_ce(tiny_cache, folder, "--epochs", "1") == 0
    return folder


@pytest.fixture
def ce_run_copy(ce_run, tmp_path) -> Path:
    """tmp_path holding a copy of ce_run's run CE, as if train_ce(tiny_cache, tmp_path, "--epochs",
    "1") had just run there."""
    shutil.copytree(ce_run / "CE", tmp_path / "CE")
    return tmp_path


def test_one_epoch_tiny_run_writes_every_artifact(ce_run):
    run = ce_run / "CE"
    for name in ("config.json", "history.json", "curves.png", "model.pt", "eval_test.json",
                 "eval_test.md", "checkpoints/last.pt", "checkpoints/epoch_001.pt"):
        assert (run / name).is_file(), name
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0]
    assert 0 <= history[0]["val_accuracy"] <= 1 and history[0]["loss"] > 0
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 1 and config["lr"] == 1e-3 and config["method"] == "CE"
    assert config["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                  text=True).stdout.strip()
    result = json.loads((run / "eval_test.json").read_text())
    assert result["clean"]["n"] == 18
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["batch"] == 0 and "optimizer" in checkpoint


def test_defaults_follow_the_paper():
    cfg = config.parse_config("CE", {}, argv=[], training=SCRIPTS["CE"].TRAINING)
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.seed, cfg.model) == (70, 64, 1e-3, 0, "resnet18a")
    assert (cfg.max_length, cfg.random_pad, cfg.checkpoint_every) == (30720, 3072, 10)
    assert (cfg.sweep_steps, cfg.sweep_restarts) == (100, 2)


def test_preset_then_method_override_then_flag():
    cfg = config.parse_config("X", {"adv_start_epoch": 10}, ["--preset", "demo", "--epochs", "3"],
                               training=PAPER_TRAINING)
    assert cfg.preset == "demo" and cfg.adv_start_epoch == 2 and cfg.epochs == 3
    assert cfg.max_length == config.PRESETS["demo"].settings["max_length"]


@pytest.mark.slow  # trains two runs end to end
def test_resume_after_an_epoch_gives_the_same_weights_bit_for_bit(tiny_cache, tmp_path, ce_run):
    assert train_ce(tiny_cache, tmp_path / "straight", "--epochs", "2", "--checkpoint_every", "1") == 0
    checkpoints = tmp_path / "straight" / "CE" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    shutil.copytree(ce_run / "CE", tmp_path / "split" / "CE")  # one epoch, as split's first training
    assert train_ce(tiny_cache, tmp_path / "split", "--epochs", "2", "--resume") == 0
    assert_same_weights(weights(tmp_path / "straight" / "CE" / "model.pt"),
                        weights(tmp_path / "split" / "CE" / "model.pt"))
    straight = json.loads((tmp_path / "straight" / "CE" / "history.json").read_text())
    split = json.loads((tmp_path / "split" / "CE" / "history.json").read_text())
    assert len(straight) == 2 and [h["loss"] for h in straight] == [h["loss"] for h in split]


@pytest.mark.slow  # trains to a stop, then resumes to the end
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_at_the_next_batch_and_resume_finishes_identically(tiny_cache, tmp_path, ce_run,
                                                                          signum):
    calls = {"n": 0}

    def interrupted_loss(model, x, y, mask, epoch, cfg):
        calls["n"] += 1
        if calls["n"] == 2:  # as if Ctrl-C (or a scheduler's SIGTERM) arrived during the second batch
            os.kill(os.getpid(), signum)
        return ce_loss(model, x, y, mask, epoch, cfg)

    status = train_ce(tiny_cache, tmp_path / "stopped", "--epochs", "1", loss_fn=interrupted_loss)
    assert status == 128 + signum
    saved = torch.load(tmp_path / "stopped" / "CE" / "checkpoints" / "last.pt", weights_only=True)
    assert (saved["epoch"], saved["batch"]) == (0, 2)
    assert not (tmp_path / "stopped" / "CE" / "model.pt").exists()
    assert train_ce(tiny_cache, tmp_path / "stopped", "--epochs", "1", "--resume") == 0
    assert_same_weights(weights(ce_run / "CE" / "model.pt"),  # straight through
                        weights(tmp_path / "stopped" / "CE" / "model.pt"))


def test_a_second_signal_stops_at_once_in_one_line_with_its_status(tiny_cache, tmp_path, capsys):
    def twice_interrupted_loss(model, x, y, mask, epoch, cfg):
        os.kill(os.getpid(), signal.SIGTERM)  # the first asks to stop after this batch
        os.kill(os.getpid(), signal.SIGTERM)  # the second, before it ends: at once
        raise AssertionError("the second signal did not stop the training")

    status = train_ce(tiny_cache, tmp_path, "--epochs", "1", loss_fn=twice_interrupted_loss)
    assert status == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("error: stopped at once by a second signal 15, without saving the batch in progress; "
                       "--resume continues from the last checkpoint")
    assert not (tmp_path / "CE" / "checkpoints" / "last.pt").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back


@pytest.mark.slow  # trains two runs end to end
def test_same_seed_same_weights_other_seed_other_weights(tiny_cache, tmp_path, ce_run):
    for name, seed in [("b", "0"), ("c", "1")]:  # a: ce_run, seed 0
        assert train_ce(tiny_cache, tmp_path / name, "--epochs", "1", "--seed", seed) == 0
    assert_same_weights(weights(ce_run / "CE" / "model.pt"), weights(tmp_path / "b" / "CE" / "model.pt"))
    other = weights(tmp_path / "c" / "CE" / "model.pt")
    assert not torch.equal(other["classifier.weight"], weights(ce_run / "CE" / "model.pt")["classifier.weight"])


def test_resume_ignores_a_truncated_checkpoint(ce_run_copy):
    tmp_path = ce_run_copy
    checkpoints = tmp_path / "CE" / "checkpoints"
    (checkpoints / "epoch_999.pt").write_bytes((checkpoints / "last.pt").read_bytes()[:1000])
    with pytest.warns(UserWarning, match="ignoring unreadable checkpoint .*epoch_999.pt"):
        path, state = newest_checkpoint(tmp_path / "CE")
    assert state["epoch"] == 1 and path.name in ("epoch_001.pt", "last.pt")


def test_non_finite_loss_stops_naming_epoch_and_batch(tiny_cache, tmp_path, capsys):
    calls = {"n": 0}

    def exploding_loss(model, x, y, mask, epoch, cfg):
        calls["n"] += 1
        loss, parts = ce_loss(model, x, y, mask, epoch, cfg)
        return (loss * float("nan") if calls["n"] == 3 else loss), parts

    status = train_ce(tiny_cache, tmp_path, "--epochs", "1", loss_fn=exploding_loss)
    assert status == 1
    err = capsys.readouterr().err
    assert "non-finite loss (nan) at epoch 0, batch 2, records " in err
    assert "no checkpoint yet" in err and "checkpoint, " not in err  # none was written in epoch 0
    assert not (tmp_path / "CE" / "model.pt").exists()


def test_non_finite_loss_names_the_batchs_records_and_the_checkpoint_kept(tiny_cache, ce_run_copy, capsys):
    tmp_path = ce_run_copy  # one epoch trained
    labels = []

    def exploding_loss(model, x, y, mask, epoch, cfg):
        labels.append(y.tolist())
        loss, parts = ce_loss(model, x, y, mask, epoch, cfg)
        return (loss * float("inf") if len(labels) == 2 else loss), parts

    assert train_ce(tiny_cache, tmp_path, "--epochs", "2", "--resume", loss_fn=exploding_loss) == 1
    err = capsys.readouterr().err.split("error: ", 1)[1].splitlines()[0]  # among the progress bars
    assert f"the last checkpoint, {tmp_path / 'CE' / 'checkpoints' / 'last.pt'}, is kept" in err
    named = err.split(", records ")[1].split(":")[0].split(", ")
    first_labels = load_cache(tiny_cache).records["First_label"]
    assert [int(first_labels[record]) - 1 for record in named] == labels[1]  # the batch, in order


def test_an_existing_run_is_not_overwritten_by_accident(tiny_cache, ce_run_copy, capsys):
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "1") == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_of_another_model(tiny_cache, ce_run_copy, capsys):
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "2", "--resume", "--model", "resnet18m") == 2
    assert "is a resnet18a, not a resnet18m" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--model", "resnet99"], "--model: unknown model 'resnet99'"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--lr", "inf"], "--lr must be positive and finite, got inf"),
    (["--device", "mps"], "--device mps: MPS is not available on this machine"),
    (["--device", "xpu"], "--device xpu: not supported"),
    (["--epoch", "3"], "unrecognized arguments: --epoch 3"),
    (["--max_length", "3000"], "multiple of 1024"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--sweeps", "pgd_inf"], "unknown sweep 'pgd_inf'"),
    (["--sweep_restarts", "0"], "--sweep_restarts must be at least 1"),
    (["--bucket"], "--bucket needs --model resnet18a_vl"),
    (["--seed", "-1"], "--seed must be between 0 and 4294967295 (numpy's seeds), got -1"),
    (["--seed", "99999999999"], "--seed must be between 0 and 4294967295 (numpy's seeds), got 99999999999"),
    (["--seed", str(2**32)], "--seed must be between 0 and 4294967295 (numpy's seeds), got 4294967296"),
    (["--data_dir", ""], "argument --data_dir/--data-dir: an empty path names no folder"),
    (["--result_dir", ""], "argument --result_dir/--result-dir: an empty path names no folder"),
    (["--run_name", "a" * 300], "--run_name aaaaaaaaaaaaaaaaaaaa...: 300 characters, a folder name has at most 255"),
    (["--noise_sd", "-0.5"], "--noise_sd must be a finite non-negative number, got -0.5"),
    (["--noise_sd", "nan"], "--noise_sd must be a finite non-negative number, got nan"),
    (["--noise_sd", "inf"], "--noise_sd must be a finite non-negative number, got inf"),
])
def test_bad_flags_give_one_line_and_exit_status_2(tmp_path, capsys, flags, message, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where an empty folder flag would write
    assert harness.main(CE_SCRIPT, argv=["--result_dir", str(tmp_path / "R"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # refused before the run folder is made


@pytest.mark.parametrize("value,message", [("-0.1", "--eps must be a finite non-negative number, got -0.1"),
                                           ("nan", "--eps must be a finite non-negative number, got nan"),
                                           ("inf", "--eps must be a finite non-negative number, got inf"),
                                           ("abc", "argument --eps: invalid float value: 'abc'")])
def test_bad_method_hyperparameter_is_rejected(tmp_path, capsys, value, message):
    script = script_with(SCRIPTS["advls"], loss_fn=ce_loss, HYPERPARAMETERS={"eps": 0.01}, check_hyperparameters=None)
    status = harness.main(script, argv=["--result_dir", str(tmp_path), "--eps", value])
    assert status == 2 and message in capsys.readouterr().err


def test_the_largest_seed_trains_and_evaluates_its_sweeps(tiny_cache, tmp_path):
    """config.MAX_SEED reaches numpy's legacy seeding, the samplers' RandomState([seed, epoch]) and the
    sweeps' torch generators, and each takes it."""
    assert train_ce(tiny_cache, tmp_path, "--epochs", "1", "--max_batches", "1", "--seed", str(config.MAX_SEED),
                    "--sweeps", "white") == 0
    result = json.loads((tmp_path / "CE" / "robustness_test.json").read_text())
    assert result["sweeps"]["white"]["settings"]["seed"] == config.MAX_SEED


def test_unwritable_result_folder_is_named(tiny_cache, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status = harness.main(CE_SCRIPT, argv=["--data_dir", str(tiny_cache), "--result_dir", str(blocker)])
    assert status == 2 and f"cannot write to {blocker / 'CE'}" in capsys.readouterr().err


def test_a_file_that_cannot_be_written_ends_the_training_in_one_line_with_status_1(tiny_cache, tmp_path,
                                                                                   monkeypatch, one_error_line):
    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "CE"))

    monkeypatch.setattr(harness, "start_run", disk_full)
    assert train_ce(tiny_cache, tmp_path) == 1
    assert one_error_line() == f"error: [Errno 28] No space left on device: '{tmp_path / 'CE'}'"


def test_script_reports_missing_data_without_a_traceback(tmp_path):
    status, _, err = run_script(REPO / "CPSC2018_CNN_CE.py", "--data_dir", str(tmp_path / "nowhere"),
                                "--result_dir", str(tmp_path / "r"))
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert f"python preprocess.py --raw_dir RECORDS --out_dir {tmp_path / 'nowhere'}" in err
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


@pytest.mark.slow  # trains two runs end to end
def test_variable_length_mode_trains_and_resumes_identically(tiny_cache, tmp_path):
    flags = ("--model", "resnet18a_vl", "--bucket", "--random_pad", "1024")
    assert train_ce(tiny_cache, tmp_path / "straight", "--epochs", "2", *flags) == 0
    assert train_ce(tiny_cache, tmp_path / "split", "--epochs", "1", *flags) == 0
    assert train_ce(tiny_cache, tmp_path / "split", "--epochs", "2", "--resume", *flags) == 0
    assert_same_weights(weights(tmp_path / "straight" / "CE" / "model.pt"),
                        weights(tmp_path / "split" / "CE" / "model.pt"))
    config = json.loads((tmp_path / "straight" / "CE" / "config.json").read_text())
    assert config["model"] == "resnet18a_vl" and config["bucket"] is True


def test_resume_refuses_other_training_settings(tiny_cache, ce_run_copy, capsys):
    tmp_path = ce_run_copy  # one epoch trained
    assert train_ce(tiny_cache, tmp_path, "--epochs", "2", "--resume", "--lr", "0.01") == 2
    assert "was trained with --lr 0.001, not 0.01" in capsys.readouterr().err
    assert json.loads((tmp_path / "CE" / "config.json").read_text())["lr"] == 1e-3  # kept


def folder_state(folder: Path) -> dict:
    """Each path under ``folder`` (and ``folder``) with its modification time and a file's bytes;
    the lock file only by its name (every command that takes the folder writes its id there)."""
    return {path: None if path.name == LOCK_NAME else (path.stat().st_mtime_ns, path.is_file() and path.read_bytes())
            for path in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("flags,refusal", [
    (["--lr", "0.01"], "was trained with --lr 0.001, not 0.01"),
    (["--model", "resnet18m"], "is a resnet18a, not a resnet18m"),
    (["--epochs", "1", "--bucket"], "--bucket needs --model resnet18a_vl"),
], ids=["other_settings", "other_model", "bad_flag"])
def test_a_refused_resume_leaves_the_run_folder_as_it_was_and_an_accepted_one_records_its_config(
        tiny_cache, ce_run_copy, one_error_line, flags, refusal):
    run = ce_run_copy / "CE"
    before = folder_state(run)
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "2", "--resume", *flags) == 2
    assert refusal in one_error_line()
    assert folder_state(run) == before
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "1", "--resume") == 0  # trained already: evaluated again
    assert sorted(path.name for path in run.glob("config*.json")) == ["config.json", "config_resume_1.json"]
    assert json.loads((run / "config_resume_1.json").read_text())["resume"] is True


def test_resume_refuses_another_data_folder(tiny_cache, ce_run_copy, capsys):
    tmp_path = ce_run_copy  # one epoch trained
    other = tmp_path / "other_cache"
    shutil.copytree(tiny_cache, other)
    capsys.readouterr()
    assert train_ce(other, tmp_path, "--epochs", "2", "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --resume: {tmp_path / 'CE'} was trained with --data_dir {tiny_cache}, "
                   f"not {other}")
    assert train_ce(Path(os.path.relpath(tiny_cache)), tmp_path, "--epochs", "2", "--resume") == 0  # the same folder


@pytest.mark.parametrize("name", ["..", ".", "../../x", "ABSOLUTE", "a/b", "x y"])
def test_a_run_name_outside_the_result_folder_is_refused_and_nothing_is_touched(tmp_path, capsys, name):
    result_dir, sentinel = tmp_path / "work" / "R", tmp_path / "work" / "sentinel.txt"
    (result_dir / "other_run").mkdir(parents=True)
    (result_dir / "other_run" / "config.json").write_text("{}")
    sentinel.write_text("keep me")
    name = str(tmp_path / "abs") if name == "ABSOLUTE" else name
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    flags = ["--result_dir", str(result_dir), "--run_name", name, "--overwrite", "--epochs", "1"]
    assert harness.main(CE_SCRIPT, argv=flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --run_name {name!r}: a run name is one folder name") and "\n" not in err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert sentinel.read_text() == "keep me"


def test_overwrite_leaves_a_folder_that_is_not_a_run_alone(tiny_cache, tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"run_name": "CE", "method": "CE"}))
    for name in ("notes", "other"):  # other: a run's config.json, but not of a run of that name
        flags = ["--data_dir", str(tiny_cache), "--result_dir", str(tmp_path), "--run_name", name, "--overwrite"]
        assert harness.main(CE_SCRIPT, argv=flags) == 2
        assert f"--overwrite: {tmp_path / name} is not a run folder of this project" in capsys.readouterr().err
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert (tmp_path / "other" / "config.json").is_file()


# Trains like train_ce in a process of its own; its first training batch waits for the file "go".
PAUSED_TRAINING = """
import sys, time
from pathlib import Path
from types import SimpleNamespace
import torch.nn.functional as F
import CPSC2018_CNN_CE
from training import harness
started, go = Path(sys.argv[1]), Path(sys.argv[2])
def loss(model, x, y, mask, epoch, cfg):
    if not started.exists():
        started.write_text("")
        while not go.exists():
            time.sleep(0.05)
    return F.cross_entropy(model(x, mask), y), {}
sys.exit(harness.main(SimpleNamespace(**{**vars(CPSC2018_CNN_CE), "loss_fn": loss}), argv=sys.argv[3:]))
"""


def wait_for(path: Path, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_trainings_of_one_run_folder_never_run_together(tiny_cache, tmp_path):
    flags = tiny_flags(tiny_cache, tmp_path / "R", "--epochs", "1", "--max_batches", "2")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAINING, str(tmp_path / "started"),
                              str(tmp_path / "go"), *flags], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(tmp_path / "started", first)
        for extra in ([], ["--resume"], ["--overwrite"]):
            status, _, err = run_script(REPO / "CPSC2018_CNN_CE.py", *flags, *extra)  # another process holds it
            assert status == 2, err
            assert err.strip() == (f"error: {tmp_path / 'R' / 'CE'}: this run folder is in use by "
                                             f"process {first.pid} (it holds {tmp_path / 'R' / 'CE' / '.lock'}); "
                                             "wait for it to finish or stop it")
        (tmp_path / "go").write_text("")
        assert first.wait(timeout=300) == 0, first.communicate()[1][-2000:]
    finally:
        first.kill()
        first.communicate()
    model, config = load_model(tmp_path / "R" / "CE")
    assert config["run_name"] == "CE" and (tmp_path / "R" / "CE" / "eval_test.json").is_file()
    assert not list((tmp_path / "R").rglob("*.tmp"))


@pytest.mark.slow
def test_a_killed_training_leaves_no_stale_lock(tiny_cache, tmp_path):
    flags = tiny_flags(tiny_cache, tmp_path, "--epochs", "1", "--max_batches", "2")
    first = subprocess.Popen([sys.executable, "-c", PAUSED_TRAINING, str(tmp_path / "started"),
                              str(tmp_path / "go"), *flags], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "started", first)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    assert train_ce(tiny_cache, tmp_path, "--epochs", "1", "--max_batches", "2", "--overwrite") == 0


def test_overwrite_removes_every_file_of_the_old_run(tiny_cache, ce_run_copy):
    tmp_path = ce_run_copy  # one epoch trained
    stale = tmp_path / "CE" / "robustness_test.json"
    stale.write_text("{}")
    calls = {"n": 0}

    def stopping_loss(model, x, y, mask, epoch, cfg):
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return ce_loss(model, x, y, mask, epoch, cfg)

    assert train_ce(tiny_cache, tmp_path, "--epochs", "1", "--overwrite", loss_fn=stopping_loss) == 130
    assert not stale.exists() and not (tmp_path / "CE" / "model.pt").exists()
    assert sorted(p.name for p in (tmp_path / "CE" / "checkpoints").iterdir()) == ["last.pt"]


def test_the_optimizer_is_fused_adam_with_the_reference_update():
    """make_optimizer's fused Adam against torch's per-tensor loop (an independent implementation)."""
    torch.manual_seed(0)
    fused_model = torch.nn.Linear(16, 4)
    loop_model = torch.nn.Linear(16, 4)
    loop_model.load_state_dict(fused_model.state_dict())
    initial = fused_model.weight.detach().clone()
    fused = harness.make_optimizer(fused_model, 1e-2, torch.device("cpu"))
    loop = torch.optim.Adam(loop_model.parameters(), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] is True and fused.defaults["lr"] == 1e-2
    x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (loop_model, loop)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for fused_parameter, loop_parameter in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(fused_parameter, loop_parameter, rtol=1e-6, atol=1e-7)
    assert (fused_model.weight - initial).abs().min() > 1e-3  # five steps of about lr each


@pytest.mark.parametrize("linked,flags", [("CE", ["--overwrite"]), ("CE", ["--resume"]), ("CE", []),
                                          ("CE/checkpoints", ["--resume"])])
def test_a_linked_run_folder_is_refused_and_its_target_left_alone(tiny_cache, ce_run_copy, one_error_line,
                                                                  linked, flags):
    elsewhere = ce_run_copy / "elsewhere"
    shutil.move(ce_run_copy / linked, elsewhere)
    (ce_run_copy / linked).symlink_to(elsewhere)
    before = {path: path.stat().st_mtime_ns for path in elsewhere.rglob("*")}
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "2", *flags) == 2
    assert one_error_line() == (f"error: {ce_run_copy / linked} is a link to {elsewhere}: training never writes "
                                "through a link; replace it by a real folder, or choose another --run_name")
    assert {path: path.stat().st_mtime_ns for path in elsewhere.rglob("*")} == before


def test_the_next_run_removes_the_temporary_files_a_killed_one_left(ce_run_copy, capsys):
    run = ce_run_copy / "CE"
    left = [temporary_path(run / "checkpoints" / "last.pt"), temporary_path(run / "history.json")]
    cfg = SimpleNamespace(result_dir=str(ce_run_copy), run_name="CE", resume=True, overwrite=False)
    with contextlib.ExitStack() as locks:
        assert prepare_run_dir(cfg, locks) == run
    assert not any(path.exists() for path in left) and (run / "checkpoints" / "last.pt").is_file()
    assert f"removed the temporary files an interrupted write left in {run / 'checkpoints'}" in capsys.readouterr().out


def edit_checkpoint(run: Path, edit) -> Path:
    """Leave ``run`` one checkpoint, last.pt, changed by ``edit`` as if it had been saved so."""
    (run / "checkpoints" / "epoch_001.pt").unlink()
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def other_data(state, **fingerprint):
    state["config"]["data_fingerprint"].update(fingerprint)


@pytest.mark.parametrize("edit,problem", [
    (lambda state: other_data(state, records=180, samples=5_000_000),
     "it was trained on 180 records (5000000 samples), --data_dir {cache} now holds 54 ({samples})"),
    (lambda state: other_data(state, records_sha256="0" * 16),
     "it was trained on other record names, labels or lengths than --data_dir {cache} now holds (as many "
     "records and samples)"),
    (lambda state: state["config"].pop("data_fingerprint"),
     "its checkpoint does not record the data it was trained on (it predates data fingerprints), so nothing "
     "shows that --data_dir {cache} still holds that data"),
], ids=["other_count", "other_records", "no_fingerprint"])
def test_resume_refuses_a_run_trained_on_other_data(tiny_cache, ce_run_copy, one_error_line, edit, problem):
    edit_checkpoint(ce_run_copy / "CE", edit)
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "2", "--resume") == 2
    samples = int(load_cache(tiny_cache).records["length"].sum())
    assert one_error_line() == (f"error: --resume: {ce_run_copy / 'CE'}: {problem.format(cache=tiny_cache, samples=samples)}; "
                                "start it again with --overwrite, or under another --run_name")


def adam_state_of_another_shape(state):
    state["optimizer"]["state"][0]["exp_avg"] = torch.zeros(5)


@pytest.mark.parametrize("edit,problem", [
    (lambda state: state["model"].__setitem__("trunk.stem.0.weight", torch.zeros(3, 3)),
     "its model weight trunk.stem.0.weight is [3, 3], the model's is [64, 8, 11]"),
    (lambda state: state.__setitem__("config", [1, 2]), "its config is of type list, not dict"),
    (lambda state: state.__setitem__("epoch", "1"), "its epoch is '1', not a whole number >= 0"),
    (adam_state_of_another_shape, "its optimizer's exp_avg of parameter 0 is [5], the parameter is [64, 8, 11]"),
    (lambda state: state["optimizer"].__setitem__("param_groups", []),
     "its optimizer state holds other parameter groups than the model's"),
    (lambda state: state["rng"].pop("loader"), "does not load (KeyError: 'loader')"),
], ids=["weight_shape", "config_list", "epoch_text", "adam_state_shape", "param_groups", "rng_state"])
def test_resume_refuses_a_malformed_checkpoint_in_one_line_naming_it(tiny_cache, ce_run_copy, one_error_line,
                                                                     edit, problem):
    path = edit_checkpoint(ce_run_copy / "CE", edit)
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "2", "--resume") == 2
    assert one_error_line() == f"error: --resume: {path}: {problem}"


def test_resume_refuses_fewer_epochs_than_the_run_was_started_for(tiny_cache, ce_run_copy, one_error_line):
    def at_epoch_9_of_10(state):
        state["epoch"], state["config"]["epochs"] = 9, 10

    edit_checkpoint(ce_run_copy / "CE", at_epoch_9_of_10)
    assert train_ce(tiny_cache, ce_run_copy, "--epochs", "3", "--resume") == 2
    assert one_error_line() == (f"error: --resume: {ce_run_copy / 'CE'} is at epoch 9 of --epochs 10: --epochs 3 "
                                "would shorten it (only --epochs may grow)")
    assert not (ce_run_copy / "CE" / "checkpoints" / "epoch_003.pt").exists()


def test_data_the_loaders_refuse_ends_the_training_in_one_line(tiny_cache, tmp_path, monkeypatch, one_error_line):
    def empty_training_split(*args, **kwargs):  # as get_dataloaders refuses a cache with an empty split
        raise DataError(f"{tiny_cache}/train.csv: the training split is empty")

    monkeypatch.setattr(harness, "get_dataloaders", empty_training_split)
    assert train_ce(tiny_cache, tmp_path, "--epochs", "1") == 2
    assert one_error_line() == f"error: {tiny_cache}/train.csv: the training split is empty"


# --- Gaussian-noise training (--noise_sd) ---------------------------------------------------

def test_gaussian_noise_is_on_the_signal_only_with_the_requested_variance():
    """Against the sample variance over 600 000 signal values: its standard error is
    sd^2 * sqrt(2 / n) (0.18 % of sd^2), so a 1 % tolerance is more than 5 standard errors."""
    torch.manual_seed(0)
    lengths = [5000, 3000, 1000, 3000]
    mask = (torch.arange(5000) >= 5000 - torch.tensor(lengths)[:, None]).float()[:, None, :]
    x = (2 * torch.rand(4, 50, 5000) - 1) * mask
    sd = 0.25
    noisy = harness.gaussian_noise(x, mask, sd)
    assert torch.equal(noisy * (1 - mask), torch.zeros_like(x))  # the padding stays exactly zero
    noise = (noisy - x)[mask.expand_as(x).bool()]
    assert noise.numel() == 50 * sum(lengths)
    assert noise.var().item() == pytest.approx(sd ** 2, rel=0.01)
    assert abs(noise.mean().item()) < 5 * sd / noise.numel() ** 0.5
    assert noisy.abs().max() > 1  # not clipped: the noise of randomized smoothing


def test_noise_sd_reaches_every_training_batch_and_names_the_run(tiny_cache, tmp_path):
    """The loss sees inputs beyond the scaled range [-1, 1] on the signal (the noise, sd 0.5)
    and zeros on the padding; the run is named for it."""
    seen = []

    def recording_ce(model, x, y, mask, epoch, cfg):
        seen.append((x.detach().clone(), mask.clone()))
        return ce_loss(model, x, y, mask, epoch, cfg)

    assert train_ce(tiny_cache, tmp_path, "--epochs", "1", "--max_batches", "2", "--noise_sd", "0.5",
                    loss_fn=recording_ce) == 0
    assert (tmp_path / "CE_noise_0.5" / "model.pt").is_file()
    assert len(seen) == 2
    for x, mask in seen:
        assert (x * (1 - mask)).abs().max() == 0 and (x * mask).abs().max() > 1.2


# --- a method's guard (fast_adv's against catastrophic overfitting) ----------------------------

@pytest.mark.parametrize("scores,collapsed", [
    ([0.5], False), ([None, None, 0.5], False), ([0.4, 0.8, 0.41], False), ([0.4, 0.8, 0.39], True),
    ([0.6, 0.35, 0.25], True), ([0.6, 0.2, None], False), ([0.0, 0.0], False),
])
def test_a_score_collapses_when_it_falls_more_than_the_fraction_below_the_best(scores, collapsed):
    assert harness.collapsed(scores, 0.5) is collapsed


def test_a_collapsed_guard_stops_the_run_and_the_best_epoch_is_its_model(tiny_cache, tmp_path, capsys):
    """A stubbed guard whose PGD accuracy collapses at the third epoch (0.8 -> 0.1): training stops
    there, model.pt holds the second epoch's weights (best.pt's, not last.pt's) and the
    evaluated model is that one; one line and the results say so."""
    sequence = {0: 0.5, 1: 0.8, 2: 0.1, 3: 0.9}

    def stubbed_guard(model, x, y, mask, epoch, cfg):
        assert len(x) == len(set(y.tolist())) == 9  # the class-balanced validation batch of tiny_cache
        return sequence[epoch]

    script = script_with(SCRIPTS["fast_adv"], guard=stubbed_guard, loss_fn=ce_loss)
    assert harness.main(script, argv=tiny_flags(tiny_cache, tmp_path, "--epochs", "4", "--max_batches", "1",
                                                "--checkpoint_every", "1", "--run_name", "F")) == 0
    run = tmp_path / "F"
    lines = [line for line in capsys.readouterr().out.splitlines() if "catastrophic overfitting" in line]
    assert lines == [f"catastrophic overfitting: the guard's PGD accuracy fell from 0.800 (epoch 1) to 0.100 at "
                     f"epoch 2, more than --overfit_drop 0.5 below its best; training stopped and the run keeps "
                     f"epoch 1's model ({run / 'checkpoints' / 'best.pt'})"]
    history = json.loads((run / "history.json").read_text())
    assert [h["guard_accuracy"] for h in history] == [0.5, 0.8, 0.1]
    checkpoints = run / "checkpoints"
    assert_same_weights(weights(run / "model.pt"), weights(checkpoints / "epoch_002.pt"))
    assert_same_weights(weights(checkpoints / "best.pt"), weights(checkpoints / "epoch_002.pt"))
    assert not torch.equal(weights(run / "model.pt")["classifier.weight"],
                           weights(checkpoints / "last.pt")["classifier.weight"])
    stopped = {"epoch": 2, "guard_accuracy": 0.1, "best_epoch": 1, "best_guard_accuracy": 0.8}
    assert json.loads((run / "eval_test.json").read_text())["settings"]["stopped_early"] == stopped
    assert torch.load(run / "model.pt", weights_only=True)["config"]["stopped_early"] == stopped


def test_a_guarded_run_resumes_only_with_the_guards_batch_size(tiny_cache, tmp_path, capsys, one_error_line):
    script = script_with(SCRIPTS["fast_adv"], guard=lambda *args: 0.5, loss_fn=ce_loss)
    flags = ("--epochs", "2", "--max_batches", "1", "--run_name", "F")
    assert harness.main(script, argv=tiny_flags(tiny_cache, tmp_path, *flags, "--epochs", "1")) == 0
    capsys.readouterr()
    assert harness.main(script, argv=tiny_flags(tiny_cache, tmp_path, *flags, "--resume", "--eval_batch_size", "4")) == 2
    assert one_error_line() == f"error: --resume: {tmp_path / 'F'} was trained with --eval_batch_size 18, not 4"
    assert harness.main(script_with(SCRIPTS["CE"], loss_fn=ce_loss),  # unguarded: the size is free
                        argv=tiny_flags(tiny_cache, tmp_path, "--epochs", "1", "--max_batches", "1", "--run_name", "C")) == 0
    assert harness.main(script_with(SCRIPTS["CE"], loss_fn=ce_loss), argv=tiny_flags(
        tiny_cache, tmp_path, "--epochs", "2", "--max_batches", "1", "--run_name", "C", "--resume",
        "--eval_batch_size", "4")) == 0


def test_a_signal_while_the_guard_collapses_then_resume_still_stops_at_the_best_epoch(tiny_cache, tmp_path):
    """SIGTERM arrives during the epoch whose guard collapses: last.pt already holds the collapsed
    weights and no model.pt is written; --resume must not train on from them but stop again,
    with the best epoch's model and stopped_early, as the uninterrupted run."""
    sequence, kill = {0: 0.5, 1: 0.8, 2: 0.1, 3: 0.9}, {"at": None}

    def stubbed_guard(model, x, y, mask, epoch, cfg):
        if epoch == kill["at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return sequence[epoch]

    script = script_with(SCRIPTS["fast_adv"], guard=stubbed_guard, loss_fn=ce_loss)
    flags = ("--epochs", "4", "--max_batches", "1", "--checkpoint_every", "1", "--run_name", "F")
    assert harness.main(script, argv=tiny_flags(tiny_cache, tmp_path / "a", *flags)) == 0
    kill["at"] = 2
    assert harness.main(script, argv=tiny_flags(tiny_cache, tmp_path / "b", *flags)) == 128 + signal.SIGTERM
    assert not (tmp_path / "b" / "F" / "model.pt").exists()
    kill["at"] = None
    assert harness.main(script, argv=tiny_flags(tiny_cache, tmp_path / "b", *flags, "--resume")) == 0
    uninterrupted, resumed = tmp_path / "a" / "F", tmp_path / "b" / "F"
    assert_same_weights(weights(uninterrupted / "model.pt"), weights(resumed / "model.pt"))
    assert [h["guard_accuracy"] for h in json.loads((resumed / "history.json").read_text())] == [0.5, 0.8, 0.1]
    stopped = {"epoch": 2, "guard_accuracy": 0.1, "best_epoch": 1, "best_guard_accuracy": 0.8}
    assert torch.load(resumed / "model.pt", weights_only=True)["config"]["stopped_early"] == stopped
