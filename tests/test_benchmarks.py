"""The benchmark scripts run in a smoke size, so that they cannot rot (no timing is asserted),
and refuse bad flags with one line."""
import importlib
import json
import subprocess
import sys

import pytest

from helpers import REPO

SCRIPTS = ["bench_methods.py", "bench_pgd.py", "bench_variable_length.py", "bench_autoattack.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_smoke_run_writes_its_figures(script, tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "benchmarks/" in done.stdout  # the command line is printed with the figures
    result = json.loads(out.read_text())
    assert result  # figures were written
    if script == "bench_methods.py":
        rows = {r["row"]: r for r in result["rows"]}
        assert {"CE", "NSR", "jacob", "jacob (1 projection)", "advls", "data: training loader",
                "eval: clean forward", "eval: PGD-100"} == set(rows)
        assert all(r["seconds_per_sample"] > 0 and r["peak_memory_mb"] > 0 for r in rows.values())
    if script == "bench_variable_length.py":
        assert len(result["results"]) == 4 and result["epoch"]["samples"] > 0
        assert all(r["ms_per_sample"] > 0 and r["speedup_vs_fixed_resnet18a"] > 0
                   for r in result["results"].values())
        assert "SYNTHETIC" in result["records"]  # the demo data says what it is
    if script == "bench_autoattack.py":
        assert set(result["results"]) == {"bare forward+input-grad", "apgd-ce", "apgd-dlr",
                                          "bare forward", "square"}
        assert result["results"]["square"]["queries_per_s"] > 0


BAD_FLAGS = [(script, ["--threads", "0"], "--threads must be >= 1") for script in SCRIPTS] + [
    (script, ["--device", "no-such-device"], "--device no-such-device: not available here")
    for script in SCRIPTS] + [
    ("bench_variable_length.py", ["--records", "no/such/folder"], "--records no/such/folder: not a folder"),
    ("bench_variable_length.py", ["--batch-size", "0"], "--batch_size must be >= 1"),  # the hyphen alias
    ("bench_pgd.py", ["--early_stop_eps", "x"], "argument --early_stop_eps/--early-stop-eps: invalid float value"),
]


def benchmark(script: str):
    """The benchmark script as a module (its main(argv) is what the script runs)."""
    return importlib.import_module(f"benchmarks.{script.removesuffix('.py')}")


@pytest.mark.parametrize("script, flags, problem", BAD_FLAGS)
def test_bad_flags_give_one_line(script, flags, problem, capsys):
    assert benchmark(script).main(flags) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {problem}")


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_script_ends_a_bad_flag_with_one_line_and_status_2(script):
    """main's status is the process's (the smoke run above checks status 0)."""
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), "--threads", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --threads must be >= 1")


@pytest.mark.parametrize("script", SCRIPTS)
def test_flags_are_never_abbreviated(script, one_error_line, monkeypatch):
    module = benchmark(script)

    def accepted(*args):  # a benchmark that took --thread for --threads would run from here on
        raise AssertionError("--thread was taken for --threads")

    for holder in (module, importlib.import_module("benchmarks.common")):  # where main reaches it
        monkeypatch.setattr(holder, "open_device", accepted, raising=False)
    assert module.main(["--thread", "1"]) == 2
    assert one_error_line() == "error: unrecognized arguments: --thread 1"
