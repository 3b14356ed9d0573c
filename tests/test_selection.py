"""analysis/selection.py: each criterion's pick, the selection report, the cost estimate; and the
scaled-down study end to end through reproduce.py."""
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import config
import reproduce
from analysis import selection
from helpers import REPO, run_script

LEVELS = [0.0, 0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1]


def sweep_result(accuracy, f1):
    """A pgd_linf result at the paper's levels, its AUCs computed here (trapezoids over 0..0.1)."""
    def auc(values):
        return sum((b - a) * (u + v) / 2 for a, b, u, v in zip(LEVELS, LEVELS[1:], values, values[1:])) / LEVELS[-1]

    return {"sweep": "pgd_linf", "level_list": "paper", "levels": LEVELS, "axis_levels": LEVELS,
            "accuracy": accuracy, "mean_f1": f1, "auc": auc(accuracy), "auc_f1": auc(f1), "n": 9,
            "settings": {"steps": 2, "restarts": 1, "max_batches": 0, "seed": 0}}


def test_each_criterion_picks_its_best_value_and_a_tie_goes_to_the_first():
    robust = sweep_result([0.8] * 9, [0.7] * 9)             # best AUCs
    accurate = sweep_result([0.9] + [0.1] * 8, [0.9] + [0.1] * 8)  # best clean scores
    tied = sweep_result([0.9] + [0.1] * 8, [0.5] + [0.1] * 8)  # ties clean accuracy, after `accurate`
    chosen = selection.picks({0.4: robust, 0.6: accurate, 0.8: tied})
    assert chosen == {"clean accuracy": (0.6, 0.9), "clean mean F1": (0.6, 0.9),
                      "AUC of accuracy": (0.4, pytest.approx(0.8)), "AUC of mean F1": (0.4, pytest.approx(0.7))}


def test_cost_estimate_follows_the_benchmark_figures():
    rows = {r["row"]: r["seconds_per_sample"] for r in json.loads(
        (REPO / "benchmarks" / "results" / "methods_cpu.json").read_text())["rows"]}
    cfg = SimpleNamespace(epochs=70, batch_size=64, max_batches=0, sweep_steps=100, sweep_restarts=2,
                          levels="paper", jacobian_projections=0)
    cost = selection.estimate_seconds("jacob", cfg, "pgd_linf")
    assert cost["train"] == pytest.approx(70 * 208 * 64 * rows["jacob"])  # ceil(13302 / 64) = 208 batches
    assert cost["clean evaluation"] == pytest.approx(495 * rows["eval: clean forward"])
    assert cost["pgd_linf (validation)"] == pytest.approx(45 * 8 * 2 * rows["eval: PGD-100"])


def test_dry_run_lists_every_run_of_the_grids_with_its_cost(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert reproduce.main(["--preset", "paper-selection", "--dry-run"]) == 0
    out = capsys.readouterr().out
    runs = [f"NSR_beta1_1_beta2_{v:g}" for v in (0.4, 0.6, 0.8, 0.9, 1.0, 1.1, 1.2)] + \
           [f"jacob_beta_{v}" for v in range(4, 85, 10)]
    costs = [line for line in out.splitlines() if line.split(":")[0] in runs]
    assert [line.split(":")[0] for line in costs] == runs
    assert all("--split val" in line and "--levels paper" in line and "--sweeps pgd_linf" in line
               for line in out.splitlines() if "evaluate.py" in line)
    assert "benchmarks/results/methods_cpu.json" in out and "'eval: PGD-100'" in out
    assert re.search(r"^total: \d+ h \d\d min of single-thread CPU time for 16 runs", out, re.M)
    assert not any(tmp_path.iterdir())


def test_a_run_the_benchmark_did_not_time_has_no_estimate_and_the_others_still_print(capsys):
    jobs = reproduce.plan_jobs("paper-selection", ["jacob"])
    jobs[0].cfg.jacobian_projections = 3  # a setting methods_cpu.json has no row for
    reproduce.print_costs(jobs)
    out = capsys.readouterr().out
    assert f"{jobs[0].run_dir.name}: no estimate (methods_cpu.json has no row 'jacob (3 projection)')" in out
    assert out.count("'jacob (3 projection)'") == 1  # not among the rows the figures come from
    assert sum(line.startswith("jacob_beta_") and " h " in line for line in out.splitlines()) == len(jobs) - 1
    assert re.search(rf"^total: .* for {len(jobs)} runs, 1 of them without an estimate ", out, re.M)


class InProcessStage:
    """subprocess.Popen for reproduce's stages (``python script flags``), each run in this
    process by run_script: the stages' own processes are tested by the smoke chain
    (test_reproduce.py)."""

    def __init__(self, command: list[str], env: dict, start_new_session: bool):
        self.status = run_script(Path(command[1]), *command[2:], capture=False)[0]

    def wait(self, timeout: float | None = None) -> int:
        return self.status


@pytest.mark.slow
def test_scaled_down_selection_picks_what_the_validation_results_say(tmp_path, monkeypatch):
    """Tiny synthetic data, 2 values per grid, 1 epoch of 2 batches, a 2-step PGD sweep: the
    report's picks are recomputed here from each run's robustness_val.json."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, "subprocess", SimpleNamespace(Popen=InProcessStage))
    settings = {**config.PRESETS["smoke"].settings, "data_dir": "processed", "result_dir": "result", "sweeps": ""}
    monkeypatch.setitem(config.PRESETS, "paper-selection", config.Preset(
        settings, config.SYNTHETIC_NOTE, "train", 1, 1, (("NSR", "beta2", (0.4, 1.2)), ("jacob", "beta", (4, 84))),
        synthetic_records_per_class=4, synthetic_max_seconds=8.0, selection=True))
    assert reproduce.main(["--preset", "paper-selection"]) == 0
    report = (tmp_path / "result" / "selection.md").read_text()
    picks = json.loads((tmp_path / "result" / "selection" / "picks.json").read_text())
    for method, setting, values, name in (("NSR", "beta2", (0.4, 1.2), "NSR_beta1_1_beta2_{:g}"),
                                          ("jacob", "beta", (4, 84), "jacob_beta_{:g}_proj_1")):
        results = {v: json.loads((tmp_path / "result" / name.format(v) / "robustness_val.json").read_text())
                   ["sweeps"]["pgd_linf"] for v in values}
        for result in results.values():
            assert result["level_list"] == "paper" and result["levels"][1:] == LEVELS[1:]
            cm = np.array(result["confusion_matrix"][0])
            assert result["accuracy"][0] == pytest.approx(np.mean(np.diag(cm) / cm.sum(axis=1)))
        scores = {"clean accuracy": {v: r["accuracy"][0] for v, r in results.items()},
                  "clean mean F1": {v: r["mean_f1"][0] for v, r in results.items()},
                  "AUC of accuracy": {v: np.trapezoid(r["accuracy"], LEVELS) / 0.1 for v, r in results.items()},
                  "AUC of mean F1": {v: np.trapezoid(r["mean_f1"], LEVELS) / 0.1 for v, r in results.items()}}
        for criterion, by_value in scores.items():
            best = max(by_value.values())
            first_best = next(v for v in values if math.isclose(by_value[v], best, abs_tol=1e-12))
            assert picks[method][criterion][setting] == first_best, (method, criterion)
            assert f"| {criterion} | {first_best:g} | {best:.3f} |" in report
        assert f"## {method}: {setting}" in report
        assert (tmp_path / "result" / "selection" / f"{method}_f1.png").stat().st_size > 1000
