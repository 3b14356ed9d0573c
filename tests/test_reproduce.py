"""reproduce.py: the smoke chain end to end, skipping on a rerun, the report, the paper's plan."""
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

import config
import reproduce
from analysis.report import Timings
from helpers import PAPER_TRAINING, SMOKE_RUNS, certificate

RUNS = list(SMOKE_RUNS.values())


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` as rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|(---\|)+", line):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.slow
def test_smoke_chain_writes_report_runs_and_timings(smoke_chain):
    root, first, _ = smoke_chain
    result = root / "result" / "smoke"
    assert (root / "data" / "smoke" / "train" / "REFERENCE.csv").is_file()
    assert (root / "data" / "smoke" / "processed" / "meta.json").is_file()
    for run in RUNS:
        for name in ("model.pt", "eval_test.json", "robustness_test.json", "config.json"):
            assert (result / run / name).is_file(), f"{run}/{name}"
        assert json.loads((result / run / "config.json").read_text())["preset"] == "smoke"
    for name in ("clean.md", "clean.csv", "white_accuracy.md", "white_f1.md", "pgd_linf_accuracy.md", "pgd_linf_f1.csv", "pgd_linf_accuracy.png", "white_f1.png"):
        assert (result / "compare" / name).is_file(), name
    # Every run was trained, in the paper's order, each stage announced and timed.
    order = [first.stdout.index(f"=== train {method}") for method in ("CE", "NSR", "jacob", "advls")]
    assert order == sorted(order)
    assert all(f"({run}): done in" in first.stdout for run in RUNS)
    assert "=== data: generate synthetic records" in first.stdout and "=== data: preprocess" in first.stdout
    # The preset's certification (config.PRESETS["smoke"].certify: CE at sigma 0.25), after the trainings.
    assert first.stdout.index("=== certify CE (CE) sigma 0.25") > first.stdout.index("=== train advls")
    certified = json.loads((result / "CE" / "certify_0.25.json").read_text())
    assert certified["n"] == 9 and certified["settings"]["n"] == 16


@pytest.mark.slow
def test_second_invocation_skips_every_finished_stage(smoke_chain):
    root, first, second = smoke_chain
    assert "=== train" not in second.stdout and "=== data" not in second.stdout
    for run in RUNS:
        assert re.search(rf"^skip train .*\({re.escape(run)}\)", second.stdout, re.M), run
    assert "skip data: generate synthetic records" in second.stdout
    assert "skip data: preprocess" in second.stdout
    assert "=== certify" not in second.stdout and "skip certify CE (CE) sigma 0.25" in second.stdout
    timings = json.loads((root / "result" / "smoke" / "timings.json").read_text())
    skipped = [s for s in timings["stages"] if s["stage"].startswith(("train ", "data: "))]
    assert len(skipped) == 6 and all(s["status"] == "skipped" for s in skipped)
    # A skipped stage keeps the time of the invocation that ran it.
    assert all(s["earlier"]["status"] == "ran" and s["earlier"]["seconds"] > 0 for s in skipped)


@pytest.mark.slow
def test_report_tables_have_one_row_per_run_with_the_runs_numbers(smoke_chain):
    root, _, _ = smoke_chain
    result = root / "result" / "smoke"
    report = (result / "report.md").read_text()
    assert "synthetic signals, not CPSC2018" in report
    assert "## Clean metrics" in report and "(`pgd_linf`)" in report and "(`white`)" in report
    tables = markdown_tables(report)
    clean = next(t for t in tables if t[0][1] == "F1 Normal")
    pgd_accuracy, pgd_f1 = [t for t in tables if t[0][1:3] == ["clean", "0.001"]]  # accuracy, then F1
    white_accuracy, white_f1 = [t for t in tables if t[0][1:3] == ["clean", "0.05"]]
    for table in (clean, pgd_accuracy, pgd_f1, white_accuracy, white_f1):
        assert [row[0] for row in table[1:]] == RUNS
    # The numbers are the runs' own evaluation files, independently read here.
    header = clean[0]
    for row in clean[1:]:
        scores = json.loads((result / row[0] / "eval_test.json").read_text())["clean"]
        assert float(row[header.index("mean_f1")]) == pytest.approx(scores["mean_f1"], abs=5e-4)
        assert float(row[header.index("accuracy")]) == pytest.approx(scores["accuracy"], abs=5e-4)
        assert row[header.index("n")] == str(scores["n"]) == "9"
    for table, key, auc in ((pgd_accuracy, "accuracy", "auc"), (pgd_f1, "mean_f1", "auc_f1")):
        assert table[0][-1] == "AUC (paper levels)"
        assert table[0][1:-1] == ["clean", "0.001", "0.003", "0.005", "0.007", "0.01", "0.03", "0.05", "0.1"]
        for row in table[1:]:
            sweep = json.loads((result / row[0] / "robustness_test.json").read_text())["sweeps"]["pgd_linf"]
            assert [float(v) for v in row[1:-1]] == pytest.approx(sweep[key], abs=5e-4)
            assert float(row[-1]) == pytest.approx(sweep[auc], abs=5e-4)
    # Settings, checkpoints and times are stated; every linked figure exists.
    assert "2 steps of size eps/10, 1 random start(s)" in report
    for run in RUNS:
        assert f"`{run}/model.pt`" in report
    links = re.findall(r"\]\(([^)]+\.png)\)", report)
    assert {f"compare/{sweep}_{metric}.png" for sweep in ("pgd_linf", "white") for metric in ("accuracy", "f1")} \
        <= set(links)
    assert "compare/adversarial_example.png" in links
    assert all(f"{run}/{name}" in links for run in RUNS for name in ("curves.png", "confusion_test.png"))
    assert all((result / link).is_file() for link in links)
    assert "## Stage timings" in report and "train CE (CE)" in report
    assert "## Certified robustness (randomized smoothing)" in report and "compare/certified_accuracy.png" in links


@pytest.mark.slow
def test_run_state_follows_the_files(smoke_chain, tmp_path, monkeypatch):
    root, _, _ = smoke_chain
    monkeypatch.chdir(root)  # where the chain ran: the runs' relative data_dir is resolved from there
    shutil.copytree(root / "result" / "smoke" / "CE", tmp_path / "CE")
    (job,) = reproduce.plan_jobs("smoke", ["CE"], str(tmp_path))
    assert job.run_dir == tmp_path / "CE" and reproduce.run_state(job) == "done"
    (job.run_dir / "robustness_test.json").unlink()
    assert reproduce.run_state(job) == "evaluate"
    assert "evaluate.py" in " ".join(reproduce.job_command(job, "evaluate"))
    (job.run_dir / "model.pt").unlink()
    assert reproduce.run_state(job) == "resume"
    assert reproduce.job_command(job, "resume")[-1] == "--resume"
    config = json.loads((job.run_dir / "config.json").read_text())
    (job.run_dir / "config.json").write_text(json.dumps({**config, "epochs": 5}))
    with pytest.raises(reproduce.ReproduceError, match="epochs=5"):
        reproduce.run_state(job)
    shutil.rmtree(job.run_dir / "checkpoints")
    assert reproduce.run_state(job) == "train"


@pytest.mark.slow
def test_cache_is_reused_only_with_the_same_split_settings(smoke_chain):
    root, _, _ = smoke_chain
    data, raw = root / "data" / "smoke" / "processed", root / "data" / "smoke" / "train"
    assert reproduce.cache_valid(data, raw, 1, 1)
    assert not reproduce.cache_valid(data, raw, 1, 2)
    assert not reproduce.cache_valid(data, root, 1, 1)  # made from another folder
    assert reproduce.synthetic_complete(raw, 4) and not reproduce.synthetic_complete(raw, 5)


def test_dry_run_of_the_paper_prints_the_seven_training_commands_in_order(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ") and "CPSC2018_CNN_" in line]
    scripts = [re.search(r"(CPSC2018_CNN_\w+)\.py", c).group(1) for c in commands]
    assert scripts == ["CPSC2018_CNN_CE", "CPSC2018_CNN_NSR", "CPSC2018_CNN_jacob"] + \
        ["CPSC2018_CNN_ce_adv_pgd_ls"] * 4
    assert [re.search(r"--eps (\S+)", c).group(1) for c in commands[3:]] == ["0.005", "0.01", "0.05", "0.1"]
    # The preset alone sets the runs' folders and sweeps, as when a script runs with --preset paper.
    for command in commands:
        assert re.search(r"\.py --preset paper( --eps \S+)?$", command), command
    assert "preprocess.py --raw_dir data/CPSC2018/train" in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_reproduce_passes_on_a_result_folder_it_is_given(tmp_path, monkeypatch, capsys):
    (job,) = reproduce.plan_jobs("smoke", ["CE"], "elsewhere")
    assert job.flags == ["--preset", "smoke", "--result_dir", "elsewhere"]
    assert job.cfg.result_dir == "elsewhere" and job.run_dir == Path("elsewhere") / "CE"
    assert job.cfg.data_dir == config.PRESETS["smoke"].settings["data_dir"]
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--preset", "smoke", "--result_dir", "elsewhere", "--methods", "CE", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "CPSC2018_CNN_CE.py --preset smoke --result_dir elsewhere\n" in out
    assert "preprocess.py --raw_dir data/smoke/train --out_dir data/smoke/processed" in out


def test_a_failing_stage_is_named_and_stops_without_a_traceback(tmp_path, monkeypatch, capfd):
    """capfd: the stage's own process writes to the same stderr."""
    monkeypatch.chdir(tmp_path)
    foreign = tmp_path / "not_synthetic"
    foreign.mkdir()
    (foreign / "A0001.mat").write_bytes(b"not written by synthetic.py")
    assert reproduce.main(["--preset", "smoke", "--raw-dir", str(foreign)]) == 1
    err = capfd.readouterr().err
    assert "stage 'data: generate synthetic records' failed with exit status" in err
    assert "Traceback" not in err and "A0001.mat" in err
    assert not (tmp_path / "result" / "smoke" / "CE").exists()  # the chain stopped there


def test_a_run_trained_on_another_data_folder_is_not_this_presets_run(tmp_path):
    cfg = config.parse_config("CE", {}, argv=["--preset", "smoke", "--data_dir", str(tmp_path / "data")],
                               training=PAPER_TRAINING)
    job = reproduce.Job("CE", reproduce.SCRIPTS["CE"], [], cfg, tmp_path / "CE")
    (job.run_dir / "checkpoints").mkdir(parents=True)
    (job.run_dir / "checkpoints" / "last.pt").write_bytes(b"")
    saved = {**vars(cfg), "data_dir": str(tmp_path / "other")}
    (job.run_dir / "config.json").write_text(json.dumps(saved))
    with pytest.raises(reproduce.ReproduceError, match=f"trained with data_dir='{tmp_path / 'other'}'"):
        reproduce.run_state(job)
    (job.run_dir / "config.json").write_text(json.dumps({**saved, "data_dir": str(tmp_path / "data")}))
    assert reproduce.run_state(job) == "resume"


def chain_of_one_stage(monkeypatch, tmp_path: Path, stage: str, command: list[str]) -> None:
    """reproduce.main runs only the stage ``stage`` of ``command``, its times in tmp_path/timings.json."""
    timings = Timings(tmp_path / "timings.json", "smoke", dry_run=False)
    monkeypatch.setattr(reproduce, "reproduce", lambda args: reproduce.run_stage(stage, command, timings, False))


def test_sigterm_during_a_stage_is_forwarded_and_ends_with_status_143(tmp_path, monkeypatch, capsys):
    """The stage's process sends SIGTERM to reproduce, which forwards it and exits 128 + 15."""
    stage = [sys.executable, "-c", "import os, signal, time; time.sleep(0.2); "
             "os.kill(os.getppid(), signal.SIGTERM); time.sleep(60)"]
    chain_of_one_stage(monkeypatch, tmp_path, "train CE", stage)
    started = time.perf_counter()
    assert reproduce.main(["--preset", "smoke"]) == 128 + signal.SIGTERM == 143
    assert time.perf_counter() - started < 30  # the stage was stopped, not waited for
    assert "error: interrupted during stage 'train CE'" in capsys.readouterr().err
    assert json.loads((tmp_path / "timings.json").read_text())["stages"][0]["status"] == "interrupted"


def ended(pid: int, within: float = 2.0) -> bool:
    """The process ends within ``within`` seconds (SIGKILL takes effect when it is next scheduled); a
    zombie, ended but not yet reaped by its new parent, has ended."""
    deadline = time.monotonic() + within
    while True:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_a_stage_that_does_not_stop_after_sigint_is_killed_with_its_children(tmp_path, monkeypatch, capsys):
    """The stage's process ignores SIGTERM and has a child of its own: after the grace time both are
    gone, reproduce exits 128 + 2 with one line, and no process is left to hold the run folder."""
    pids = tmp_path / "pids"
    stage = [sys.executable, "-c", "import os, signal, subprocess, sys, time; "
             "signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)']); "
             f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); "
             "os.kill(os.getppid(), signal.SIGINT); time.sleep(20)"]
    monkeypatch.setattr(reproduce, "STOP_GRACE_SECONDS", 0.5)
    chain_of_one_stage(monkeypatch, tmp_path, "train CE", stage)
    started = time.perf_counter()
    assert reproduce.main(["--preset", "smoke"]) == 128 + signal.SIGINT
    assert time.perf_counter() - started < 15  # not the 20 s the stage would take
    assert capsys.readouterr().err == ("error: interrupted during stage 'train CE' (killed: it had not stopped 0.5 s "
                                       "after the signal); rerun the same command to continue (training resumes "
                                       "from its last checkpoint)\n")
    assert all(ended(int(pid)) for pid in pids.read_text().split())
    assert json.loads((tmp_path / "timings.json").read_text())["stages"][0]["status"] == "killed"


def test_sigint_reaches_the_stage_as_sigterm(tmp_path, monkeypatch, capsys):
    """Not as SIGINT, a KeyboardInterrupt and its traceback in a stage that does not catch it."""
    received = tmp_path / "received"
    stage = [sys.executable, "-c", "import os, signal, time; "
             f"signal.signal(signal.SIGTERM, lambda *a: (open({str(received)!r}, 'a').write('TERM'), os._exit(0))); "
             f"signal.signal(signal.SIGINT, lambda *a: (open({str(received)!r}, 'a').write('INT'), os._exit(0))); "
             "os.kill(os.getppid(), signal.SIGINT); time.sleep(20)"]
    chain_of_one_stage(monkeypatch, tmp_path, "data: preprocess", stage)
    assert reproduce.main(["--preset", "smoke"]) == 128 + signal.SIGINT
    assert received.read_text() == "TERM"
    assert "error: interrupted during stage 'data: preprocess';" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--result_dir", "taken"], "--result_dir taken: taken is a file, not a folder"),
    (["--result_dir", "taken/sub"], "--result_dir taken/sub: taken is a file, not a folder"),
    (["--raw_dir", "taken"], "--raw_dir taken: taken is a file, not a folder"),
    (["--result_dir", ""], "argument --result_dir/--result-dir: an empty path names no folder"),
    (["--raw_dir", " "], "argument --raw_dir/--raw-dir: an empty path names no folder"),
])
def test_a_folder_flag_naming_a_file_or_nothing_is_refused_before_any_work(tmp_path, monkeypatch, one_error_line,
                                                                           flags, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "taken").write_text("notes")
    assert reproduce.main(["--preset", "smoke", "--methods", "CE", *flags]) == 2
    assert one_error_line() == f"error: {message}"
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]  # no data generated, no folder made


def rewrite_json(path: Path, change) -> None:
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(content))


@pytest.mark.parametrize("file,change,message", [
    ("CE/eval_test.json", lambda r: r["clean"].update(accuracy="0.5"), "malformed clean metrics ('accuracy' is '0.5')"),
    ("CE/robustness_test.json", lambda r: r["sweeps"]["white"].update(auc="high"),
     "malformed 'white' results ('auc' is 'high')"),
    ("CE/config.json", None, "its data_dir is 5, not a string: not the settings of a run of this project"),
    ("CE/history.json", None, "epoch 1: 'seconds' is '12': not a history that training writes"),
])
def test_result_files_of_the_wrong_type_are_refused_in_one_line_naming_the_file_and_the_field(
        tmp_path, fake_run, capsys, file, change, message):
    result = tmp_path / "result"
    fake_run(result / "CE")
    (result / "CE" / "config.json").write_text(json.dumps({"data_dir": 5}))
    (result / "CE" / "history.json").write_text(json.dumps([{"seconds": "12", "val_accuracy": 0.5}]))
    for name in ("config.json", "history.json"):  # each case damages one file; the others are as training wrote them
        if not file.endswith(name):
            (result / "CE" / name).write_text(json.dumps({"data_dir": "data/smoke/processed"} if name == "config.json"
                                                         else [{"seconds": 12.0, "val_accuracy": 0.5}]))
    if change:
        rewrite_json(result / file, change)
    assert reproduce.main(["--preset", "smoke", "--skip_train", "--methods", "CE", "--result_dir", str(result)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: {result / file}: {message}") and "Traceback" not in err


def test_a_damaged_timings_json_is_set_aside_with_a_note(tmp_path, fake_run, capsys):
    result = tmp_path / "result"
    fake_run(result / "CE")
    (result / "timings.json").write_text(json.dumps({"preset": "smoke", "stages": [{"stage": "train CE (CE)"}]}))
    assert reproduce.main(["--preset", "smoke", "--skip_train", "--methods", "CE", "--result_dir", str(result)]) == 0
    assert (f"note: {result / 'timings.json'}: stage 1: 'status' is None: the earlier invocations' stage times are "
            "dropped\n") in capsys.readouterr().out
    stages = json.loads((result / "timings.json").read_text())["stages"]
    assert [(s["stage"], s["status"]) for s in stages] == [("compare", "ran"), ("report", "ran")]


def test_a_cache_whose_meta_has_the_wrong_types_is_rebuilt_with_a_note(tiny_cache, tmp_path, capsys):
    cache, raw_dir = tmp_path / "processed", tiny_cache.parent / "train"
    shutil.copytree(tiny_cache, cache)
    assert reproduce.cache_valid(cache, raw_dir, 1, 2)
    rewrite_json(cache / "meta.json", lambda meta: meta.update(settings=[1, 2]))
    assert not reproduce.cache_valid(cache, raw_dir, 1, 2)  # so prepare_data runs preprocess again
    assert capsys.readouterr().out == (f"note: {cache / 'meta.json'}: 'settings' is [1, 2]: the cache is taken as "
                                       "damaged\n")


def test_damaged_evaluation_results_are_evaluated_again_with_a_note(tmp_path, fake_run, capsys):
    (job,) = reproduce.plan_jobs("smoke", ["CE"], str(tmp_path))
    settings = {"steps": job.cfg.sweep_steps, "restarts": job.cfg.sweep_restarts,
                "max_batches": job.cfg.sweep_max_batches, "seed": 0}
    levels = [0.0, 0.01, 0.05]
    sweeps = {name: {"sweep": name, "level_list": "paper", "levels": levels, "axis_levels": levels,
                     "accuracy": [1.0] * 3, "mean_f1": [1.0] * 3, "auc": 1.0, "auc_f1": 1.0, "n": 9,
                     "settings": settings} for name in ("white", "pgd_linf")}
    fake_run(job.run_dir, sweeps)
    assert reproduce.evaluation_complete(job)
    rewrite_json(job.run_dir / "robustness_test.json", lambda r: r["sweeps"]["pgd_linf"].update(auc_f1=None))
    assert not reproduce.evaluation_complete(job)
    assert capsys.readouterr().out == (f"note: {job.run_dir / 'robustness_test.json'}: malformed 'pgd_linf' results "
                                       "('auc_f1' is None): evaluate the run again (this invocation does)\n")


def test_a_file_that_cannot_be_written_while_running_is_status_1(tmp_path, fake_run, capsys):
    result = tmp_path / "result"
    fake_run(result / "CE")
    (result / "compare" / "clean.csv").mkdir(parents=True)  # in the way of the comparison's first table
    assert reproduce.main(["--preset", "smoke", "--skip_train", "--methods", "CE", "--result_dir", str(result)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: [Errno 21] Is a directory") and "clean.csv" in err


def test_flags_are_never_abbreviated(capsys):
    assert reproduce.main(["--dry", "--methods", "CE"]) == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --dry\n"


def test_bad_methods_flag_is_one_line_error(capsys):
    assert reproduce.main(["--methods", "CE,svm", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --methods: unknown method 'svm' (known: CE, NSR, jacob, advls, trades, fast_adv, all)"


def test_mini_without_raw_dir_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--preset", "mini", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --preset mini needs --raw_dir DIR")
    assert not any(tmp_path.iterdir())


def test_mini_takes_its_records_from_raw_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--preset", "mini", "--raw-dir", "records", "--dry-run"]) == 0
    assert "preprocess.py --raw_dir records --out_dir data/mini/processed" in capsys.readouterr().out


def planned_scripts(out: str) -> list[str]:
    """The training commands a dry run printed, each as its script's name and its flags after --preset P."""
    return [re.sub(r"^.*/(CPSC2018_CNN_\w+)\.py --preset \S+", r"\1", line) for line in out.splitlines()
            if line.startswith("$ ") and "CPSC2018_CNN_" in line]


@pytest.mark.parametrize("flags,runs", [
    (["--preset", "baselines"], ["CPSC2018_CNN_CE --noise_sd 0", "CPSC2018_CNN_CE --noise_sd 0.25", "CPSC2018_CNN_NSR",
                                 "CPSC2018_CNN_jacob", *(f"CPSC2018_CNN_ce_adv_pgd_ls --eps {eps}"
                                                         for eps in ("0.005", "0.01", "0.05", "0.1")),
                                 "CPSC2018_CNN_trades", "CPSC2018_CNN_fast_adv"]),
    (["--preset", "demo"], ["CPSC2018_CNN_CE", "CPSC2018_CNN_NSR", "CPSC2018_CNN_jacob",
                            "CPSC2018_CNN_ce_adv_pgd_ls --eps 0.01"]),
    (["--preset", "demo", "--methods", "all"], ["CPSC2018_CNN_CE --noise_sd 0", "CPSC2018_CNN_CE --noise_sd 0.25",
                                                "CPSC2018_CNN_NSR", "CPSC2018_CNN_jacob",
                                                "CPSC2018_CNN_ce_adv_pgd_ls --eps 0.01", "CPSC2018_CNN_trades",
                                                "CPSC2018_CNN_fast_adv"]),
    (["--preset", "demo", "--methods", "CE,trades"], ["CPSC2018_CNN_CE --noise_sd 0", "CPSC2018_CNN_CE --noise_sd 0.25",
                                                      "CPSC2018_CNN_trades"]),
    (["--preset", "baselines", "--methods", "fast_adv"], ["CPSC2018_CNN_fast_adv"]),
])
def test_the_baselines_join_the_plan_by_preset_or_by_name(tmp_path, monkeypatch, capsys, flags, runs):
    """The paper's presets plan the paper's runs; `baselines` (and mini) add TRADES, fast adversarial
    training and CE with Gaussian noise, as does --methods all or naming a baseline with any preset."""
    monkeypatch.chdir(tmp_path)
    assert reproduce.main([*flags, "--dry_run"]) == 0
    assert planned_scripts(capsys.readouterr().out) == runs


def test_the_demo_certifies_its_presets_runs_at_each_sigma_after_training(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--preset", "demo", "--dry_run"]) == 0
    out = capsys.readouterr().out
    stages = re.findall(r"^=== (\w+) (\S+)", out, re.M)
    certified = [run for stage, run in stages if stage == "certify"]
    assert certified == ["CE", "CE", "advls", "advls"]  # config.PRESETS["demo"].certify.methods
    assert stages.index(("certify", "CE")) > max(i for i, (stage, _) in enumerate(stages) if stage == "train")
    settings = config.PRESETS["demo"].certify
    for sigma in settings.sigmas:
        assert re.search(rf"certify\.py result/demo/CE --sigma {sigma:g} --n0 {settings.n0} --n {settings.n} "
                         rf"--alpha {settings.alpha:g} --max_records {settings.max_records} --data_dir "
                         r"data/demo/processed$", out, re.M), sigma


def test_a_certification_is_redone_unless_done_with_the_presets_settings_after_training(tmp_path, capsys):
    (job,) = reproduce.plan_jobs("smoke", ["CE"], str(tmp_path))
    settings = config.PRESETS["smoke"].certify
    job.run_dir.mkdir()
    (job.run_dir / "model.pt").write_bytes(b"")
    path = job.run_dir / "certify_0.25.json"
    path.write_text(json.dumps(certificate([(0.1, True)], 0.25, settings.n0, settings.n, settings.max_records)))
    assert reproduce.certification_complete(job, settings, 0.25)
    assert not reproduce.certification_complete(job, settings, 0.5)  # no such file
    assert not reproduce.certification_complete(job, dataclasses.replace(settings, n=settings.n + 1), 0.25)
    os.utime(job.run_dir / "model.pt", (path.stat().st_mtime + 10,) * 2)  # retrained since
    assert not reproduce.certification_complete(job, settings, 0.25)
    path.write_text(json.dumps({"settings": "damaged"}))
    os.utime(job.run_dir / "model.pt", (0, 0))
    assert not reproduce.certification_complete(job, settings, 0.25)
    assert capsys.readouterr().out.startswith(f"note: {path}: malformed certification ('settings' is 'damaged')")
