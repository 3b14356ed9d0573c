"""analysis/report.py: the reproduction report, built from result files written directly (no training)."""
import config
import reproduce
from analysis.compare import compare_runs
from analysis.report import Timings, build_report


def test_report_has_the_gradient_masking_check_for_runs_with_pgd_and_the_ensemble(tmp_path, fake_run):

    result = tmp_path / "result"
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
    jobs = []
    for name, sweeps in runs.items():
        fake_run(result / name, sweeps, clean=([0, 1, 2], [0, 1, 2]))
        cfg = config.parse_script(reproduce.SCRIPTS[name], ["--preset", "smoke"])
        jobs.append(reproduce.Job(name, reproduce.SCRIPTS[name], [], cfg, result / name))
    tables = compare_runs([job.run_dir for job in jobs], result / "compare")
    report = build_report("smoke", config.PRESETS["smoke"], tmp_path / "raw", tmp_path / "data", result, jobs, jobs,
                          tables, Timings(result / "timings.json", "smoke", dry_run=True), meta=None,
                          histories=dict.fromkeys(jobs, []), configs=dict.fromkeys(jobs, {}))
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
