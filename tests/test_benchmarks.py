"""The benchmark scripts run in a smoke size, so that they cannot rot (no timing is asserted),
and refuse bad flags with one line."""
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from perturbations import autoattack
import reproduce
from analysis import selection
from benchmarks import (bench_autoattack, bench_certify, bench_ensemble, bench_methods, bench_pgd, bench_variable_length,
                        common, gpu_check)
from helpers import REPO, run_script

# script: its module (its main(argv) is what the script runs)
BENCHMARKS = {f"{module.__name__.removeprefix('benchmarks.')}.py": module
              for module in (bench_methods, bench_pgd, bench_variable_length, bench_autoattack, bench_certify)}
SCRIPTS = list(BENCHMARKS)


# bench_methods measures each row in a process of its own; two rows show that wiring, and
# test_every_row_of_bench_methods_is_measured measures every row in this process.
METHOD_ROWS = ["CE", "eval: PGD-100"]


BAD_FLAGS = [(script, ["--threads", "0"], "--threads must be >= 1") for script in SCRIPTS] + [
    (script, ["--device", "no-such-device"], "--device no-such-device: not available here")
    for script in SCRIPTS] + [
    ("bench_variable_length.py", ["--records", "no/such/folder"], "--records no/such/folder: not a folder"),
    ("bench_variable_length.py", ["--batch-size", "0"], "--batch_size must be >= 1"),  # the hyphen alias
    ("bench_pgd.py", ["--early_stop_eps", "x"], "argument --early_stop_eps/--early-stop-eps: invalid float value"),
]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_run_writes_its_figures(script, tmp_path, capsys):
    out = tmp_path / "result.json"
    rows = ["--rows", ",".join(METHOD_ROWS)] if script == "bench_methods.py" else []
    assert BENCHMARKS[script].main(["--smoke", "--threads", "1", "--out", str(out), *rows]) == 0
    assert "benchmarks/" in capsys.readouterr().out  # the command line is printed with the figures
    result = json.loads(out.read_text())
    assert result  # figures were written
    if script == "bench_methods.py":
        assert [r["row"] for r in result["rows"]] == METHOD_ROWS
        assert all(r["seconds_per_sample"] > 0 and r["peak_memory_mb"] > 0 for r in result["rows"])
    if script == "bench_variable_length.py":
        assert len(result["results"]) == 4 and result["epoch"]["samples"] > 0
        assert all(r["ms_per_sample"] > 0 and r["speedup_vs_fixed_resnet18a"] > 0
                   for r in result["results"].values())
        assert "SYNTHETIC" in result["records"]  # the demo data says what it is
    if script == "bench_autoattack.py":
        assert set(result["results"]) == {"bare forward+input-grad", "apgd-ce", "apgd-dlr",
                                          "bare forward", "square"}
        assert result["results"]["square"]["queries_per_s"] > 0
    if script == "bench_certify.py":
        assert [row["threads"] for row in result["results"]] == [1]
        assert result["results"][0]["records_per_s"] > 0 and result["results"][0]["forward_passes"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("row", ["CE", "NSR", "jacob", "jacob (1 projection)", "advls", "trades", "fast_adv",
                                 "data: training loader", "eval: clean forward", "eval: PGD-100"])
def test_every_row_of_bench_methods_is_measured(row, capsys):
    assert bench_methods.main(["--smoke", "--threads", "1", "--worker", row]) == 0
    measured = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert measured["row"] == row and measured["seconds_per_sample"] > 0 and measured["peak_memory_mb"] > 0


@pytest.mark.parametrize("script, flags, problem", BAD_FLAGS)
def test_bad_flags_give_one_line(script, flags, problem, capsys):
    assert BENCHMARKS[script].main(flags) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {problem}")


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_script_ends_a_bad_flag_with_one_line_and_status_2(script):
    """main's status is the script's exit status (the smoke run above checks status 0)."""
    status, _, err = run_script(REPO / "benchmarks" / script, "--threads", "0")
    lines = err.strip().splitlines()
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: --threads must be >= 1")


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_are_never_abbreviated(script, one_error_line, monkeypatch):
    module = BENCHMARKS[script]

    def accepted(*args):  # a benchmark that took --thread for --threads would run from here on
        raise AssertionError("--thread was taken for --threads")

    for holder in (module, common):  # where main reaches it
        monkeypatch.setattr(holder, "open_device", accepted, raising=False)
    assert module.main(["--thread", "1"]) == 2
    assert one_error_line() == "error: unrecognized arguments: --thread 1"


def torch_and_numpy_only(site: Path) -> Path:
    """A folder of links to torch, numpy and the distributions torch needs, nothing else: with
    ``python -S`` and PYTHONPATH=site, the image of a GPU machine without pandas, scipy ..."""
    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    needed, pending = set(), ["torch", "numpy"]
    while pending:
        name = canonical(pending.pop())
        if name in needed:
            continue
        needed.add(name)
        try:
            requirements = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # an optional one, not installed here
            continue
        pending += [re.match(r"[A-Za-z0-9._-]+", r).group() for r in requirements if "extra ==" not in r]
    site.mkdir()
    for top, distributions in importlib.metadata.packages_distributions().items():
        spec = importlib.util.find_spec(top) if any(canonical(d) in needed for d in distributions) else None
        if spec is not None and spec.origin not in (None, "built-in", "frozen"):
            source = Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations else Path(spec.origin)
            (site / source.name).symlink_to(source)
    return site


@pytest.mark.slow  # the whole check in a fresh interpreter: about a minute on 2 busy cores
def test_gpu_check_runs_every_stage_with_torch_and_numpy_alone(tmp_path):
    site = torch_and_numpy_only(tmp_path / "site")
    out = tmp_path / "check"
    done = subprocess.run([sys.executable, "-S", str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--tiny", "--budget_s", "600", "--out", str(out)],
                          capture_output=True, text=True, env={"PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "gpu_check.json").read_text())
    assert {"pandas", "scipy", "matplotlib"} <= set(result["versions"]["stand_ins"])  # absent, stood in for
    stages = result["stages"]
    assert [stages[name]["status"] for name in ("models: device against CPU", "attacks and losses", "training",
                                                "amp")] == ["passed"] * 4
    assert set(stages["models: device against CPU"]["models"]) == {"resnet18a", "resnet18a_vl"}
    attacked = stages["attacks and losses"]["attacks"]
    assert len(attacked) == 12 and all(r["largest_norm_over_eps"] > 0.5 for r in attacked.values())  # they moved
    assert set(stages["attacks and losses"]["losses"]) == set(bench_methods.STEP_ROWS)
    speed = [stage for name, stage in stages.items() if name.startswith("speed: ")]
    assert len(speed) == 7 and all(stage["status"] == "done" for stage in speed)
    assert all(row["status"] == "done" and row["seconds_per_step"] > 0 for stage in speed
               for row in stage["rows"].values())
    projection = stages["projection: reproduce.py --preset paper"]
    assert projection["runs_estimated"] == len(projection["runs"]) == 7 and projection["total_hours"] > 0
    report = (out / "gpu_check.md").read_text()
    assert f"torch {result['versions']['torch']}" in report and "| CE |" in report


def test_gpu_check_skips_what_its_budget_cannot_fit_and_still_writes_its_results(tmp_path, capsys):
    assert gpu_check.main(["--device", "cpu", "--tiny", "--budget_s", "1e-9", "--out", str(tmp_path)]) == 0
    stages = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]
    assert len(stages) == 12
    assert all(stage["status"].startswith("skipped: ") for stage in stages.values())
    assert "| models: device against CPU | skipped: the budget of 1e-09 s is spent" in \
        (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("flags, problem", [
    (["--device", "no-such-device"], "--device no-such-device: not available here"),
    (["--tiny", "--budget_s", "0"], "--budget_s must be a finite number > 0, got 0"),
    (["--tiny", "--budget_s", "nan"], "--budget_s must be a finite number > 0, got nan"),
    (["--tiny", "--budget_s", "inf"], "--budget_s must be a finite number > 0, got inf"),
    (["--tiny", "--compile_backend", "nope"], "--compile_backend nope: not a torch.compile backend here"),
    (["--tiny", "--out", " "], "argument --out: an empty path names no folder"),
    (["--device", "cpu", "--tiny", "--out", "{tmp}/a_file"],
     "--out {tmp}/a_file: not usable as the output folder (a file, not a folder)"),
    (["--device", "cpu", "--tiny", "--out", "{tmp}/a_file/check"],
     "--out {tmp}/a_file/check: not usable as the output folder"),
    ([], "the following arguments are required: --out"),
])
def test_gpu_check_refuses_bad_flags_in_one_line(flags, problem, tmp_path, one_error_line):
    (tmp_path / "a_file").touch()
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    argv = flags if "--out" in flags or not flags else [*flags, "--out", str(tmp_path / "check")]
    assert gpu_check.main(argv) == 2
    assert one_error_line().startswith(f"error: {problem.format(tmp=tmp_path)}")
    assert not (tmp_path / "check").exists()  # refused before any work


@pytest.mark.parametrize("backend", ["inductor", "eager", "aot_eager"])
def test_gpu_check_takes_the_compile_backends_torch_has(backend, tmp_path):
    """torch._dynamo.list_backends() alone leaves out eager and aot_eager."""
    assert gpu_check.parse_args(["--out", str(tmp_path), "--compile_backend", backend]).compile_backend == backend


def test_gpu_check_a_stage_with_a_failed_row_is_an_error_and_the_run_fails(tmp_path, monkeypatch, capsys):
    def broken_row():
        raise RuntimeError("out of memory")

    def one_speed_stage(args, device, budget, state, out):
        rows = {"fine": lambda: (lambda: None), "broken": broken_row}
        return [("speed: two rows", 0.0, lambda: gpu_check.speed_stage(lambda: rows, args, device, budget))]

    monkeypatch.setattr(gpu_check, "stage_list", one_speed_stage)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 1
    stage = json.loads((tmp_path / "gpu_check.json").read_text())["stages"]["speed: two rows"]
    assert stage["status"] == "error: 1 of 2 rows failed"
    assert [row["status"] for row in stage["rows"].values()] == ["done", "error: RuntimeError: out of memory"]
    assert "speed: two rows: error: 1 of 2 rows failed" in capsys.readouterr().out


@pytest.mark.parametrize("pgd_steps, row", [(2, "eval: PGD-2"), (100, selection.PGD_ROW)])
def test_gpu_check_names_the_pgd_row_by_its_iterations(pgd_steps, row, tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--tiny"])
    args.pgd_steps = pgd_steps
    assert list(gpu_check.evaluation_rows(args, torch.device("cpu"))) == [selection.CLEAN_ROW, row]


def test_gpu_check_projects_from_its_own_rows_with_pgd_scaled_to_100_iterations(tmp_path):
    args = gpu_check.parse_args(["--out", str(tmp_path), "--tiny", "--device", "cpu"])
    done = {"status": "done", "seconds_per_sample": 0.5}
    stages = {"speed: paper path, float32": {"rows": {row: done for row in bench_methods.STEP_ROWS}},
              "speed: evaluation": {"rows": {selection.CLEAN_ROW: done, "eval: PGD-2": done}}}
    projection = gpu_check.project_paper_cost(args, torch.device("cpu"), {"results": {
        "command": "gpu_check.py", "stages": stages}}, tmp_path)
    figures = {row["row"]: row["seconds_per_sample"] for row in
               json.loads((tmp_path / "methods.json").read_text())["rows"]}
    assert figures[selection.PGD_ROW] == 0.5 * 100 / 2 and "eval: PGD-2" not in figures
    assert projection["runs_estimated"] == len(projection["runs"]) == 7
    job = reproduce.plan_jobs("paper", ["CE"])[0]
    assert projection["runs"][job.run_dir.name]["seconds"] == selection.estimate_seconds(
        "CE", job.cfg, reproduce.SELECTION_SWEEP, tmp_path / "methods.json")
    assert projection["runs"][job.run_dir.name]["seconds"] != selection.estimate_seconds(
        "CE", job.cfg, reproduce.SELECTION_SWEEP)  # the repository's CPU figures are not the ones read


@pytest.mark.slow  # a benchmark
def test_bench_ensemble_measures_both_versions_and_square_starts_on_a_run(untrained_run, tmp_path, one_error_line):
    run = untrained_run(tmp_path / "run")
    out = tmp_path / "ensemble.json"
    assert bench_ensemble.main([str(run), "--smoke", "--threads", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["records"] == 2 and set(result["square_starts"]) == {"queries", "stripes", "lead"}
    for version, levels in result["ensembles"].items():
        assert [level["eps"] for level in levels] == [0.01]
        assert list(levels[0]["broken_by"]) == list(autoattack.ENSEMBLE_VERSIONS[version])
    assert bench_ensemble.main([str(run), "--records", "0"]) == 2
    assert one_error_line() == "error: --records must be >= 1, got 0"
    assert bench_ensemble.main([str(tmp_path / "absent")]) == 2
    assert one_error_line().startswith(f"error: {tmp_path / 'absent'}")
    no_cache = untrained_run(tmp_path / "no_cache", 0, "--data_dir", str(tmp_path / "no_cache_here"))
    assert bench_ensemble.main([str(no_cache)]) == 2
    assert one_error_line().startswith(f"error: no preprocessed CPSC2018 cache in {tmp_path / 'no_cache_here'}")


@pytest.mark.parametrize("row", ["advls", "fast_adv"])
def test_timed_training_steps_keep_the_weights_so_every_sample_stays_attacked(row):
    """A timed step changes no weight: the labels (the model's predictions) stay right and the
    adversarial term attacks the whole batch at every repeat (with lr 1e-3 the model moved and
    later repeats attacked fewer samples, timing advls and fast_adv too cheap)."""
    model, x, y, mask = bench_methods.model_and_batch("resnet18a", 2, 3072, torch.device("cpu"))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    step = bench_methods.training_step(row, model, x, y, mask)
    for _ in range(2):
        step()
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
