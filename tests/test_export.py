"""export.py: a run folder becomes a model folder (weights, config.json, model card, robustness.json)
that ECG_CNN.from_pretrained and evaluate.py load back; the refusals."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard

import certify
import evaluate
import export
from analysis.compare import certificate_path
from config import noise_levels
from ECG_CNN import from_pretrained
from helpers import certificate, logits_of


def sweep(name: str, accuracy: list[float], **extra) -> dict:
    """A robustness_sweep result of ``name`` over the paper's levels with these accuracies."""
    levels = [0.0, *noise_levels(name)]
    assert len(accuracy) == len(levels)
    return {"sweep": name, "level_list": "paper", "levels": levels, "axis_levels": levels, "accuracy": accuracy,
            "mean_f1": [a / 2 for a in accuracy], "auc": 0.5, "auc_f1": 0.25, "n": 18,
            "settings": {"steps": 2, "restarts": 1, "max_batches": 0, "seed": 0}, **extra}


PGD = [0.9, 0.88, 0.85, 0.8, 0.75, 0.7, 0.5, 0.3, 0.1]
AUTOATTACK = [0.9, 0.87, 0.84, 0.78, 0.72, 0.66, 0.45, 0.2, 0.05]


CERTIFIED = [(0.3, True), (0.6, True), (1.2, True), (0.0, False), (0.8, True)]  # (radius, correct) of 5 records


def make_older(run: Path, *names: str) -> None:
    """Date the run's files ``names`` a minute before its model.pt: results of an earlier model."""
    model_time = (run / "model.pt").stat().st_mtime
    for name in names:
        os.utime(run / name, (model_time - 60, model_time - 60))


@pytest.fixture
def evaluated_run(untrained_run, fake_run, tmp_path):
    """An untrained_run whose results (fake_run's, written after its model.pt) hold clean scores,
    PGD and autoattack sweeps and a certification at sigma 0.25 as certify.py writes it."""
    run = fake_run(tmp_path / "CE", sweeps={"pgd_linf": sweep("pgd_linf", PGD),
                                            "autoattack": sweep("autoattack", AUTOATTACK)},
                   clean=([0, 1, 2, 3, 4, 5, 6, 7, 8, 0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 1]))
    untrained_run(run)
    certificate_path(run, 0.25).write_text(json.dumps(certificate(CERTIFIED, sigma=0.25)))
    make_older(run, "model.pt")  # the results are the model's: written after it
    return run


def write_model_settings(run: Path, **settings) -> None:
    """Add ``settings`` to those saved in the run's model.pt (as training records them)."""
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    checkpoint["config"].update(settings)
    torch.save(checkpoint, run / "model.pt")


def front_matter(card: str) -> tuple[dict, str]:
    """(the YAML front matter, the Markdown after it) of a model card."""
    assert card.startswith("---\n")
    header, body = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_an_exported_run_reloads_with_bitwise_the_same_logits(exported_model):
    run, folder = exported_model
    model, _ = evaluate.load_model(run)
    assert sorted(path.name for path in folder.iterdir()) == [".lock", "README.md", "config.json", "model.safetensors"]
    assert torch.equal(logits_of(from_pretrained(folder)), logits_of(model.eval()))


def test_evaluate_reads_an_exported_folder_as_it_reads_the_run(exported_model, tmp_path):
    run, folder = exported_model
    copy = shutil.copytree(folder, tmp_path / "model")
    model, settings = evaluate.load_model(copy)
    assert settings == evaluate.load_model(run)[1] and not model.training
    assert evaluate.main([str(copy), "--sweeps", ""]) == 0
    assert evaluate.main([str(shutil.copytree(run, tmp_path / "run")), "--sweeps", ""]) == 0
    exported = json.loads((copy / "model" / "eval_test.json").read_text())  # beside model.safetensors
    assert exported["clean"] == json.loads((tmp_path / "run" / "eval_test.json").read_text())["clean"]


def test_a_run_folder_without_its_model_is_still_a_run_without_a_checkpoint(untrained_run, tmp_path):
    """A run folder holds a config.json too: without model.pt it is a run not yet trained, not a model folder."""
    run = untrained_run(tmp_path / "CE")
    (run / "config.json").write_text(json.dumps({"run_name": "CE", "method": "CE"}))
    (run / "model.pt").unlink()
    with pytest.raises(evaluate.EvaluationError, match=r"model.pt: no such checkpoint \(train the run first\)$"):
        evaluate.load_model(run)


def test_the_model_card_is_yaml_front_matter_and_markdown_with_the_runs_results(evaluated_run, tmp_path, capsys):
    assert export.main([str(evaluated_run), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out == f"exported {evaluated_run} to {tmp_path / 'out'}/: model.safetensors, " \
                                      "config.json, README.md, robustness.json\n"
    card = (tmp_path / "out" / "README.md").read_text()
    meta, body = front_matter(card)
    assert meta["license"] == "cc-by-4.0" and meta["metrics"] == ["accuracy", "f1"] and "ecg" in meta["tags"]
    [entry] = meta["model-index"]
    values = {metric["name"]: metric["value"] for result in entry["results"] for metric in result["metrics"]}
    clean = json.loads((evaluated_run / "eval_test.json").read_text())["clean"]
    certified = certificate(CERTIFIED, sigma=0.25)["certified_accuracy"]
    assert values == {"class-balanced accuracy (clean)": round(clean["accuracy"], 4),
                      "mean F1 (clean)": round(clean["mean_f1"], 4),
                      "class-balanced accuracy under PGD, L-inf budget eps=0.01": 0.7,
                      "class-balanced accuracy under AutoAttack fast (APGD-CE, APGD-DLR, Square), L-inf budget eps=0.01": 0.66,
                      **{f"certified accuracy, sigma=0.25, L2 radius {radius:g}": round(accuracy, 4)
                         for radius, accuracy in zip(certified["radii"], certified["accuracy"])}}
    assert certified["accuracy"][:3] == [0.8, 0.8, 0.6]
    assert len(ModelCard.load(tmp_path / "out" / "README.md").data.eval_results) == 4 + len(certified["radii"])  # the Hub's reader
    for text in ("**Not for clinical use.**", "## Training data and split", "## Method", "## Limitations",
                 "@inproceedings{ma2020enhance", "### Clean, test split (10 records)",
                 "| model | 0.900 | 0.880 | 0.850 | 0.800 | 0.750 | 0.700 | 0.500 | 0.300 | 0.100 |",
                 "### PGD against the ensemble (gradient-masking check)", "AutoAttack version: fast",
                 "### Certified accuracy (randomized smoothing, sigma 0.25)", "| 0.5 | 0.600 |"):
        assert text in body, text


def test_robustness_json_is_a_robustbench_entry_at_eps(evaluated_run, tmp_path):
    assert export.main([str(evaluated_run), str(tmp_path / "out"), "--eps", "0.03"]) == 0
    entry = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert {key: entry[key] for key in ("threat_model", "eps", "clean_acc", "autoattack_acc", "autoattack_version",
                                        "attacks", "number_forward_passes", "additional_data", "n_records")} == {
        "threat_model": "Linf", "eps": "0.03", "clean_acc": "90.00", "autoattack_acc": "45.00",
        "autoattack_version": "fast", "attacks": ["apgd-ce", "apgd-dlr", "square"], "number_forward_passes": 1,
        "additional_data": False, "n_records": 18}
    assert entry["attack_settings"]["steps"] == 2 and entry["name"].startswith(f"{evaluated_run.name} (CE, resnet18a)")


def test_an_autoattack_sweep_that_names_its_version_is_exported_with_it(evaluated_run, tmp_path):
    results = json.loads((evaluated_run / "robustness_test.json").read_text())
    results["sweeps"]["autoattack"].update(ensemble_version="standard")
    (evaluated_run / "robustness_test.json").write_text(json.dumps(results))
    assert export.main([str(evaluated_run), str(tmp_path / "out")]) == 0
    entry = json.loads((tmp_path / "out" / "robustness.json").read_text())
    assert entry["autoattack_version"] == "standard" and entry["attacks"] == ["apgd-ce", "apgd-t", "square"]
    assert entry["attack_settings"]["description"].startswith("AutoAttack standard")


def test_an_eps_that_the_sweep_lacks_is_refused_before_anything_is_written(evaluated_run, tmp_path, one_error_line):
    assert export.main([str(evaluated_run), str(tmp_path / "out"), "--eps", "0.02"]) == 2
    assert one_error_line() == ("error: --eps 0.02: not a level of the run's autoattack sweep "
                                "(0.001, 0.003, 0.005, 0.007, 0.01, 0.03, 0.05, 0.1)")
    assert not (tmp_path / "out").exists()


def test_a_run_without_a_finished_model_is_refused_in_one_line(untrained_run, tmp_path, one_error_line):
    run = untrained_run(tmp_path / "CE")
    (run / "checkpoints").mkdir()
    (run / "model.pt").rename(run / "checkpoints" / "epoch_001.pt")
    assert export.main([str(run), str(tmp_path / "out")]) == 2
    assert one_error_line() == f"error: {run}: no finished model (no model.pt: the run has not finished training)"
    assert not (tmp_path / "out").exists()


def test_an_out_dir_is_written_only_when_empty_or_an_earlier_export_with_overwrite(evaluated_run, exported_model,
                                                                                   tmp_path, one_error_line):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export.main([str(evaluated_run), str(out)]) == 2
    assert one_error_line() == (f"error: {out}: not empty (1 entries); pass --overwrite to replace an earlier "
                                "export there, or choose another OUT_DIR")
    assert export.main([str(evaluated_run), str(out), "--overwrite"]) == 2
    assert one_error_line() == (f"error: --overwrite: {out} holds no earlier export (no config.json of a model "
                                "folder); it is left alone")
    assert [path.name for path in out.iterdir()] == ["notes.txt"]

    # An export with robustness.json, replaced by that of a run without results: nothing stale is left.
    earlier = tmp_path / "earlier"
    assert export.main([str(evaluated_run), str(earlier)]) == 0 and (earlier / "robustness.json").is_file()
    assert export.main([str(exported_model[0]), str(earlier), "--overwrite"]) == 0
    assert sorted(path.name for path in earlier.iterdir()) == [".lock", "README.md", "config.json", "model.safetensors"]
    assert "not evaluated on its test split" in (earlier / "README.md").read_text()


def test_an_out_dir_that_is_a_link_is_refused(evaluated_run, tmp_path, one_error_line):
    (tmp_path / "target").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "target")
    assert export.main([str(evaluated_run), str(tmp_path / "out")]) == 2
    assert "a link or a file: the export writes into a real folder of its own" in one_error_line()
    assert not any(Path(tmp_path / "target").iterdir())


def test_a_run_certified_by_certify_py_is_exported_with_its_certified_accuracy(untrained_run, tmp_path, capsys):
    run = untrained_run(tmp_path / "CE")
    assert certify.main([str(run), "--sigma", "0.5", "--n0", "2", "--n", "4", "--batch_size", "4", "--max_records", "2",
                         "--alpha", "0.2", "--device", "cpu"]) == 0
    certified = json.loads(certificate_path(run, 0.5).read_text())["certified_accuracy"]
    capsys.readouterr()
    assert export.main([str(run), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().err == ""
    meta, body = front_matter((tmp_path / "out" / "README.md").read_text())
    names = [metric["name"] for result in meta["model-index"][0]["results"] for metric in result["metrics"]]
    assert names == [f"certified accuracy, sigma=0.5, L2 radius {radius:g}" for radius in certified["radii"]]
    assert "### Certified accuracy (randomized smoothing, sigma 0.5)" in body
    assert f"| 0 | {certified['accuracy'][0]:.3f} |" in body


def test_results_older_than_the_model_or_of_another_split_are_left_out_each_in_one_line(evaluated_run, tmp_path,
                                                                                          capsys):
    """A model retrained after its evaluation would be exported with its predecessor's numbers."""
    stale = ["eval_test.json", "robustness_test.json", "certify_0.25.json"]
    make_older(evaluated_run, *stale)
    val = certificate([(0.5, True)], sigma=0.5)
    val["settings"]["split"] = "val"
    certificate_path(evaluated_run, 0.5).write_text(json.dumps(val))
    assert export.main([str(evaluated_run), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [*(f"note: left out {evaluated_run / name}: older than the run's model.pt (evaluate or "
                         "certify the run again)" for name in stale),
                       f"note: left out {evaluated_run / 'certify_0.5.json'}: a certification of the val split, "
                       "not of test",
                       "note: no robustness.json: the run has no autoattack sweep on its test split "
                       f"(python evaluate.py {evaluated_run} --sweeps autoattack,...)"]
    meta, body = front_matter((tmp_path / "out" / "README.md").read_text())
    assert "model-index" not in meta and "not evaluated on its test split" in body and "Certified" not in body
    assert not (tmp_path / "out" / "robustness.json").exists()


def autoattack_as(**changes) -> dict:
    return {"autoattack": sweep("autoattack", AUTOATTACK) | changes}


@pytest.mark.parametrize("name, content, problem", [
    ("robustness_test.json", {"sweeps": autoattack_as(ensemble_version="plus")},
     "'autoattack' ran an unknown ensemble_version 'plus' (standard, fast): evaluate the run again"),
    ("robustness_test.json", {"sweeps": autoattack_as(ensemble_version=["fast"])},
     "'autoattack' ran an unknown ensemble_version ['fast'] (standard, fast): evaluate the run again"),
    ("robustness_test.json", {"sweeps": autoattack_as(levels=[str(level) for level in sweep("autoattack", AUTOATTACK)["levels"]])},
     "malformed 'autoattack' results ('levels' is ['0.0', '0.001', "),
    ("robustness_test.json", {"sweeps": {"pgd_linf": sweep("pgd_linf", PGD) | {"levels": [None] * len(PGD)}}},
     "malformed 'pgd_linf' results ('levels' is [None, None, "),
    ("certify_0.25.json", certificate(CERTIFIED) | {"settings": certificate(CERTIFIED)["settings"] | {"sigma": [1]}},
     "malformed certification ('settings' is {'sigma': [1], "),
    ("certify_0.25.json", {"sigma": 0.25, "certified_accuracy": {"0.0": 0.5}}, "malformed certification ('settings' is None)"),
    ("certify_0.25.json", [1, 2], "missing or not a JSON object: certify the run again"),
])
def test_a_malformed_result_file_is_refused_in_one_line_naming_it(evaluated_run, tmp_path, one_error_line,
                                                                  name, content, problem):
    (evaluated_run / name).write_text(json.dumps(content))
    assert export.main([str(evaluated_run), str(tmp_path / "out")]) == 2
    assert one_error_line().startswith(f"error: {evaluated_run / name}: {problem}")
    assert not (tmp_path / "out").exists()


def test_the_card_names_the_training_noise_and_the_epoch_an_early_stopped_run_keeps(untrained_run, tmp_path):
    run = untrained_run(tmp_path / "CE", 0, "--noise_sd", "0.1")
    write_model_settings(run, stopped_early={"epoch": 7, "guard_accuracy": 0.05, "best_epoch": 5,
                                             "best_guard_accuracy": 0.625})
    assert export.main([str(run), str(tmp_path / "out")]) == 0
    body = front_matter((tmp_path / "out" / "README.md").read_text())[1]
    assert "method settings: noise_sd 0.1." in body
    assert ("Training stopped early at epoch 7 (catastrophic overfitting); the weights are epoch 5's, the best "
            "guard accuracy 0.625.") in body
    assert "{" not in body.split("## Method")[1].split("## Evaluation")[0]
