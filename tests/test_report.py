"""analysis/report.py: the reproduction report, built from result files written directly (no training)."""
import json
import os
from pathlib import Path

import pytest

import config
import reproduce
from analysis.compare import EvaluationError, compare_runs
from analysis import report as report_module
from analysis.report import Timings, build_report
from helpers import certificate


def smoke_report(tmp_path, fake_run, runs: dict[str, dict], certificates: dict | None = None,
                 flags: dict[str, list[str]] | None = None, eval_settings: dict[str, dict] | None = None
                 ) -> tuple[str, Path]:
    """(report.md's text, its result folder) of the smoke preset over ``runs`` ({run: fake_run's keyword
    arguments}), each a method's run, with ``certificates`` ({run: its certify_0.25.json content}),
    ``flags`` ({run: its script's flags beside --preset smoke}) and ``eval_settings`` ({run: the
    settings its eval_test.json records})."""
    result = tmp_path / "result"
    jobs = []
    for name, made in runs.items():
        fake_run(result / name, **made)
        if name in (eval_settings or {}):
            evaluation = result / name / "eval_test.json"
            evaluation.write_text(json.dumps({**json.loads(evaluation.read_text()), "settings": eval_settings[name]}))
        if name in (certificates or {}):
            (result / name / "certify_0.25.json").write_text(json.dumps(certificates[name]))
        cfg = config.parse_script(reproduce.SCRIPTS[name], ["--preset", "smoke", *(flags or {}).get(name, [])])
        jobs.append(reproduce.Job(name, reproduce.SCRIPTS[name], [], cfg, result / name))
    tables = compare_runs([job.run_dir for job in jobs], result / "compare")
    report = build_report("smoke", config.PRESETS["smoke"], tmp_path / "raw", tmp_path / "data", result, jobs, jobs,
                          tables, Timings(result / "timings.json", "smoke", dry_run=True), meta=None,
                          histories=dict.fromkeys(jobs, []), configs=dict.fromkeys(jobs, {}))
    return report, result


def test_report_has_the_gradient_masking_check_for_runs_with_pgd_and_the_ensemble(tmp_path, fake_run):

    settings = {"steps": 2, "restarts": 1, "max_batches": 0, "seed": 0}

    def sweep(name, accuracy):
        return {"sweep": name, "level_list": "paper", "levels": [0.0, 0.01, 0.05], "axis_levels": [0.0, 0.01, 0.05],
                "accuracy": accuracy, "mean_f1": accuracy, "auc": 0.5, "auc_f1": 0.5, "n": 3, "settings": settings}

    ensemble = {**sweep("autoattack", [1.0, 0.9, 0.5]), "envelope": True, "ensemble_version": "standard",
                "broken_by": {"apgd-ce": [0, 1, 0], "apgd-t": [0, 0, 0], "square": [0, 0, 1]},
                "warnings": ["Square, which uses no gradients, broke 1 records that the white-box attacks missed"],
                "per_level": {"accuracy": [1.0, 0.9, 0.6]}}
    runs = {"NSR": {"pgd_linf": sweep("pgd_linf", [1.0, 1.0, 1.0]),
                    "autoattack": ensemble},
            "CE": {"pgd_linf": sweep("pgd_linf", [1.0, 0.5, 0.0])}}  # no ensemble: not checked
    report, _ = smoke_report(tmp_path, fake_run, {name: dict(sweeps=sweeps, clean=([0, 1, 2], [0, 1, 2]))
                                                  for name, sweeps in runs.items()})
    section = report.split("## Gradient-masking check")[1].split("## Stage timings")[0]
    assert "| NSR | 0.05 | 1.000 | 0.500 | 50.0 |  |  |" in section
    assert ("- **NSR**: FLAGGED. PGD overstates this model's robustness by 50.0 points at eps=0.05"
            in section)
    assert "| CE |" not in section and "**CE**" not in section
    # Each sweep's heading is its title in config.SWEEPS, the ensemble's too.
    assert "### PGD, L-inf budget (`pgd_linf`)" in report
    assert "### AutoAttack standard (APGD-CE, APGD-T, Square), L-inf budget (`autoattack`)" in report
    # The ensemble's section says which version ran, who broke how many, its warnings, and keeps the
    # per-level numbers beside the envelope; PGD's results predate the envelope and say so.
    section = report.split("(`autoattack`)")[1].split("### ")[0]
    assert "Robust accuracy is the envelope" in section
    assert "- **NSR**: AutoAttack standard ran; records broken first by each attack (all eps): apgd-ce 1, " \
           "apgd-t 0, square 1." in section
    assert "  - Warning: Square, which uses no gradients, broke 1 records" in section
    assert "| run | clean | 0.01 | 0.05 |" in section and "| NSR | 1.000 | 0.900 | 0.600 |" in section
    assert "Numbers per level (each eps attacked every record on its own" in report.split("(`pgd_linf`)")[1]


def test_report_has_the_certified_accuracy_of_the_certified_runs_and_their_figure(tmp_path, fake_run):
    report, result = smoke_report(tmp_path, fake_run, {"CE": {}, "NSR": {}},
                                  {"CE": certificate([(0.3, True), (1.2, True), (0.0, False), (0.6, True)])})
    section = report.split("## Certified robustness (randomized smoothing)")[1].split("\n## ")[0]
    assert "upper bound on the model's robustness" in section and "guarantee" in section
    header, row = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert header.startswith("| run | sigma | r = 0 | r = 0.25 | r = 0.5 | r = 0.75 | r = 1 | r = 1.5 | r = 2 |")
    assert row == "| CE | 0.25 | 0.750 | 0.750 | 0.500 | 0.250 | 0.250 | 0.000 | 0.000 | 1 | 4 | 4 | 16 | 0.001 | 3 s |"
    assert "![certified accuracy](compare/certified_accuracy.png)" in section
    assert (result / "compare" / "certified_accuracy.png").stat().st_size > 0


def test_a_report_without_certified_runs_has_no_certified_section_and_no_stale_figure(tmp_path, fake_run):
    figure = tmp_path / "result" / "compare" / "certified_accuracy.png"
    figure.parent.mkdir(parents=True)
    figure.write_bytes(b"an earlier report's figure")
    report, _ = smoke_report(tmp_path, fake_run, {"CE": {}})
    assert "Certified robustness" not in report and not figure.exists()


def test_a_certificate_of_another_split_or_older_than_the_model_is_left_out_and_named(tmp_path, fake_run):
    validation = certificate([(0.3, True)])
    validation["settings"]["split"] = "val"
    report, _ = smoke_report(tmp_path, fake_run, {"CE": {}, "NSR": {}},
                             {"CE": validation, "NSR": certificate([(0.3, True), (0.6, True)])})
    section = report.split("## Certified robustness (randomized smoothing)")[1].split("\n## ")[0]
    assert "Left out: `CE/certify_0.25.json` (a certification of the val split, not of test)" in section
    assert [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ") and "---" not in line] == [
        "| run", "| NSR"]
    run = tmp_path / "stale"
    (run / "result" / "CE").mkdir(parents=True)
    (run / "result" / "CE" / "certify_0.25.json").write_text(json.dumps(certificate([(0.3, True)])))
    (run / "result" / "CE" / "model.pt").write_bytes(b"retrained after the certification")
    certified = run / "result" / "CE" / "certify_0.25.json"
    os.utime(certified, (certified.stat().st_mtime - 60,) * 2)
    job = reproduce.Job("CE", reproduce.SCRIPTS["CE"], [], config.parse_script(reproduce.SCRIPTS["CE"], ["--preset", "smoke"]),
                        run / "result" / "CE")
    lines = report_module.certified_section(config.PRESETS["smoke"], [job], run / "result",
                                            lambda path: path.relative_to(run / "result").as_posix())
    assert lines == ["## Certified robustness (randomized smoothing)", "",
                     "Left out: `CE/certify_0.25.json` (older than the run's model.pt); `reproduce.py` certifies "
                     "these runs again on the test split.", ""]


def test_a_malformed_certificate_is_refused_naming_the_file(tmp_path, fake_run):
    damaged = {**certificate([(0.3, True)]), "records": [{"radius": "far", "correct": True}]}
    with pytest.raises(EvaluationError, match=r"certify_0\.25\.json: malformed certification \('records' is"):
        smoke_report(tmp_path, fake_run, {"CE": {}}, {"CE": damaged})


def test_the_runs_table_names_the_training_noise_and_the_epoch_a_stopped_run_kept(tmp_path, fake_run):
    """A run its catastrophic-overfitting guard stopped (harness.stop_collapsed) is evaluated on the
    best epoch it kept, not the last: its row says which; a noise-trained run names its noise."""
    stopped = {"epoch": 6, "guard_accuracy": 0.1, "best_epoch": 4, "best_guard_accuracy": 0.5}
    report, _ = smoke_report(tmp_path, fake_run, {"CE": {}, "fast_adv": {}}, flags={"CE": ["--noise_sd", "0.25"]},
                             eval_settings={"fast_adv": {"stopped_early": stopped}})
    rows = {line.split(" | ")[0]: line for line in report.split("## Runs")[1].split("\n## ")[0].splitlines()
            if line.startswith("| CE ") or line.startswith("| fast_adv ")}
    assert rows["| CE"].startswith("| CE | CE | noise_sd=0.25 | ") and "stopped by its guard" not in rows["| CE"]
    assert " | 0, stopped by its guard: `model.pt` is epoch 4's (guard accuracy 0.500, then 0.100) | " in rows["| fast_adv"]
