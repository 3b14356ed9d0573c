"""The benchmark scripts run in a smoke size, so that they cannot rot (no timing is asserted),
and refuse bad flags with one line."""
import json

import pytest

from benchmarks import bench_autoattack, bench_methods, bench_pgd, bench_variable_length, common
from helpers import REPO, run_script

# script: its module (its main(argv) is what the script runs)
BENCHMARKS = {f"{module.__name__.removeprefix('benchmarks.')}.py": module
              for module in (bench_methods, bench_pgd, bench_variable_length, bench_autoattack)}
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


@pytest.mark.slow
@pytest.mark.parametrize("row", ["CE", "NSR", "jacob", "jacob (1 projection)", "advls", "data: training loader",
                                 "eval: clean forward", "eval: PGD-100"])
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
