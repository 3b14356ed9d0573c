"""analysis/compare.py: the result files read and checked, the tables of several runs, the
gradient-masking check, and the folder of ``python evaluate.py compare``."""
import json
import shutil

import pandas as pd
import pytest

import evaluate
from analysis import compare
from analysis.metrics import robustness_auc


# --- the tables of evaluated runs -------------------------------------------------------------

def test_compare_writes_the_papers_tables_and_figures(two_runs, tmp_path):
    assert evaluate.main(["compare", str(two_runs / "A"), str(two_runs / "B"), "--out", str(tmp_path)]) == 0
    tables = ["clean", *(f"{sweep}_{metric}" for sweep in ("white", "pgd_linf") for metric in ("accuracy", "f1"))]
    for name in tables:
        assert (tmp_path / f"{name}.md").is_file() and (tmp_path / f"{name}.csv").is_file()
    for name in tables[1:]:
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    paper_linf = ["0.001", "0.003", "0.005", "0.007", "0.01", "0.03", "0.05", "0.1"]
    for metric, key, auc in (("accuracy", "accuracy", "auc"), ("f1", "mean_f1", "auc_f1")):
        table = pd.read_csv(tmp_path / f"pgd_linf_{metric}.csv", index_col=0)
        assert list(table.index) == ["A", "B"]
        assert list(table.columns) == ["clean", *paper_linf, "AUC (paper levels)"]
        for run in ("A", "B"):
            sweep = json.loads((two_runs / run / "robustness_test.json").read_text())["sweeps"]["pgd_linf"]
            assert list(table.loc[run])[:-1] == pytest.approx(sweep[key], abs=1e-4)
            assert table.loc[run, "AUC (paper levels)"] == pytest.approx(sweep[auc], abs=1e-4)
    table = pd.read_csv(tmp_path / "pgd_linf_accuracy.csv", index_col=0)
    for run in ("A", "B"):
        sweep = json.loads((two_runs / run / "robustness_test.json").read_text())["sweeps"]["pgd_linf"]
        assert table.loc[run, "AUC (paper levels)"] == pytest.approx(
            robustness_auc(sweep["axis_levels"], sweep["accuracy"]), abs=1e-4)
        clean = json.loads((two_runs / run / "eval_test.json").read_text())["clean"]
        assert table.loc[run, "clean"] == pytest.approx(clean["accuracy"], abs=1e-4)
        # early-stopped PGD never does better than the clean input
        assert max(sweep["accuracy"][1:]) <= sweep["accuracy"][0] + 1e-12
    markdown = (tmp_path / "clean.md").read_text().splitlines()
    assert len(markdown) == 4 and markdown[2].startswith("| A |")


@pytest.mark.slow  # an evaluation at the extended levels
def test_compare_refuses_aucs_of_different_level_lists(two_runs, tmp_path, capsys, one_error_line):
    shutil.copytree(two_runs / "B", tmp_path / "B")
    evaluate.main([str(tmp_path / "B"), "--sweeps", "pgd_linf", "--levels", "extended", "--sweep_steps", "1",
                   "--sweep_restarts", "1"])
    extended = json.loads((tmp_path / "B" / "robustness_test.json").read_text())
    assert extended["levels"] == "extended"
    assert extended["level_values"]["pgd_linf"] == [0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1, 0.2, 0.3]
    capsys.readouterr()
    assert evaluate.main(["compare", str(two_runs / "A"), str(tmp_path / "B"), "--out", str(tmp_path / "c")]) == 2
    assert one_error_line() == ("error: compare: 'pgd_linf' was swept over different level lists (A: paper, "
                                "B: extended): their AUCs cannot share a column; evaluate them with the same --levels")


def test_snr_tables_keep_clean_and_0_db_apart(tmp_path, fake_run):
    """SNR sweeps end at 0 dB, the loudest noise: the report's tables must not read it as clean."""
    levels = [None, 40, 30, 20, 15, 10, 5, 0]
    accuracy = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    for run in ("A", "B"):
        sweep = {"sweep": "muscle", "level_list": "paper", "levels": levels,
                 "axis_levels": [0.0] + [10 ** (-s / 20) for s in levels[1:]], "accuracy": accuracy,
                 "mean_f1": accuracy, "auc": 0.5, "auc_f1": 0.5, "n": 3,
                 "settings": {"steps": 0, "restarts": 1, "max_batches": 0, "seed": 0}}
        fake_run(tmp_path / run, {"muscle": sweep}, clean=([0, 1, 2], [0, 1, 1]))
    tables = compare.compare_runs([tmp_path / "A", tmp_path / "B"], tmp_path / "compare")
    header, _, first, second = tables["muscle_accuracy"].splitlines()
    assert header == "| run | clean | 40 dB | 30 dB | 20 dB | 15 dB | 10 dB | 5 dB | 0 dB | AUC (paper levels) |"
    assert first == "| A | " + " | ".join(f"{a:.3f}" for a in accuracy) + " | 0.500 |"


# --- malformed result files and folders -------------------------------------------------------

@pytest.mark.parametrize("content", ["[]", '{"clean": 3}', '{"clean": {"f1": []}}', "{not json", "\xff"])
def test_compare_refuses_malformed_results_in_one_line(tmp_path, fake_run, one_error_line, content):
    run = fake_run(tmp_path / "A")
    (run / "eval_test.json").write_bytes(content.encode("latin-1"))
    assert evaluate.main(["compare", str(run), "--out", str(tmp_path / "out")]) == 2
    assert str(run / "eval_test.json") in one_error_line()


@pytest.mark.parametrize("file,change,wrong", [
    ("eval_test.json", lambda r: r["clean"].update(accuracy="0.5"), "malformed clean metrics ('accuracy' is '0.5')"),
    ("eval_test.json", lambda r: r["clean"].update(f1=[1.0] * 8), "malformed clean metrics ('f1' is [1.0, "),
    ("eval_test.json", lambda r: r["clean"].update(n=9.5), "malformed clean metrics ('n' is 9.5)"),
    ("robustness_test.json", lambda r: r["sweeps"]["white"].update(auc="high"),
     "malformed 'white' results ('auc' is 'high')"),
    ("robustness_test.json", lambda r: r["sweeps"]["white"]["accuracy"].pop(),
     "malformed 'white' results ('accuracy' is [1.0, "),
    ("robustness_test.json", lambda r: r["sweeps"]["white"]["settings"].pop("seed"),
     "malformed 'white' results ('settings' is {"),
    ("robustness_test.json", lambda r: r["sweeps"]["white"].update(levels=None),
     "malformed 'white' results ('levels' is None)"),
    ("robustness_test.json", lambda r: r["sweeps"].update(white=[]), "malformed 'white' results (not an object)"),
])
def test_compare_refuses_result_fields_of_the_wrong_type_naming_the_file_and_the_field(tmp_path, fake_run,
                                                                                      one_error_line, file, change,
                                                                                      wrong):
    run = fake_run(tmp_path / "A")
    content = json.loads((run / file).read_text())
    change(content)
    (run / file).write_text(json.dumps(content))
    assert evaluate.main(["compare", str(run), "--out", str(tmp_path / "out")]) == 2
    assert one_error_line().startswith(f"error: {run / file}: {wrong}")


def test_a_refused_compare_creates_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default --out, result/compare, is relative
    assert evaluate.main(["compare", str(tmp_path / "missing")]) == 2
    assert "eval_test.json: not found" in capsys.readouterr().err
    assert not (tmp_path / "result").exists()


def test_compare_refuses_an_out_that_is_a_file(tmp_path, fake_run, one_error_line):
    (tmp_path / "out").write_text("")
    assert evaluate.main(["compare", str(fake_run(tmp_path / "A")), "--out", str(tmp_path / "out")]) == 2
    assert f"--out {tmp_path / 'out'}: cannot create the output folder" in one_error_line()


def test_compare_names_a_run_without_robustness_results(tmp_path, capsys, fake_run):
    runs = [fake_run(tmp_path / "A"), fake_run(tmp_path / "B", sweeps=None)]
    assert evaluate.main(["compare", *map(str, runs), "--out", str(tmp_path / "out")]) == 0
    assert (f"note: {runs[1]} has no robustness_test.json (no robustness sweeps run): it is left out of "
            "the robustness tables") in capsys.readouterr().err
    assert "B" not in (tmp_path / "out" / "white_accuracy.csv").read_text()


# --- the gradient-masking check ---------------------------------------------------------------

def sweep_result(accuracies, n=36, records=None):
    """A sweep result as robustness_sweep writes it (clean first), levels 0.01 and 0.05."""
    result = {"levels": [0.0, 0.01, 0.05], "accuracy": accuracies, "n": n}
    if records is not None:
        result["records"] = records
    return result


def test_masking_check_flags_an_ensemble_far_below_pgd():
    check = compare.masking_check({"pgd_linf": sweep_result([0.9, 0.80, 0.50]),
                                   "autoattack": sweep_result([0.9, 0.79, 0.40])})
    assert [row["eps"] for row in check["rows"]] == [0.01, 0.05]
    assert [row["gap"] for row in check["rows"]] == pytest.approx([0.01, 0.10])
    assert check["flagged"]
    assert check["verdict"].startswith("PGD overstates this model's robustness by 10.0 points at eps=0.05")
    assert "more than 2 points below PGD at eps=0.05." in check["verdict"]  # 1 point at 0.01 is noise


def test_masking_check_flags_square_beating_the_gradient_attacks():
    check = compare.masking_check({"pgd_linf": sweep_result([0.9, 0.80, 0.50]),
                                   "apgd_ce": sweep_result([0.9, 0.78, 0.45]),
                                   "autoattack": sweep_result([0.9, 0.78, 0.45]),
                                   "square": sweep_result([0.9, 0.85, 0.40])})
    assert check["flagged"] and "PGD overstates" in check["verdict"]  # 5 points at 0.05
    assert [row["gradient"] for row in check["rows"]] == [0.78, 0.45]  # the strongest one
    assert "Square, which uses no gradients, does better than the gradient attacks at eps=0.05 " \
           "(0.400 against 0.450)" in check["verdict"]


def test_masking_check_passes_a_consistent_run_and_skips_incomparable_ones():
    fine = compare.masking_check({"pgd_linf": sweep_result([0.9, 0.80, 0.50]),
                                  "autoattack": sweep_result([0.9, 0.79, 0.49]),
                                  "square": sweep_result([0.9, 0.85, 0.70])})
    assert not fine["flagged"] and fine["verdict"].startswith("No sign of gradient masking")
    assert compare.masking_check({"pgd_linf": sweep_result([0.9, 0.8, 0.5])}) is None
    other_records = compare.masking_check({"pgd_linf": sweep_result([0.9, 0.8, 0.5], records=["A1"]),
                                           "autoattack": sweep_result([0.9, 0.1, 0.1], records=["A2"])})
    assert not other_records["flagged"] and other_records["verdict"].startswith("Not compared")
    markdown = compare.masking_check_markdown({"CE": fine})
    assert "| CE | 0.05 | 0.500 | 0.490 | 1.0 | 0.700 | 0.500 |" in markdown
    assert "- **CE**: No sign of gradient masking" in markdown
