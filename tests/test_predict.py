"""predict.py: an exported model classifies CPSC2018-form records exactly as the evaluation does;
a record it cannot take is one line and the others still run; a Hub repository loads offline."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import export
import predict
from databases.cpsc2018 import CLASSES
from ECG_CNN import from_pretrained
from ECG_Dataset import get_dataloaders
from evaluate import predict as evaluate_predictions
from helpers import REPO, hub_cache, tampered, write_original_record, write_wfdb_record
from preprocess import preprocess


@pytest.fixture(scope="module")
def sample_test_split(sample_dir, tmp_path_factory):
    """data/sample preprocessed with one test record per class (the other nine train)."""
    out = tmp_path_factory.mktemp("sample_cache")
    preprocess(sample_dir, out, val_per_class=0, test_per_class=1)
    return out


def test_predict_gives_the_evaluations_probabilities_and_predictions(exported_model, sample_dir, sample_test_split,
                                                                     capsys):
    model = from_pretrained(exported_model[1])
    steps = model.config["preprocessing"]
    loader = get_dataloaders(sample_test_split, eval_batch_size=4, max_length=steps["max_length"],
                             random_pad=steps["input_length"] - steps["max_length"], splits=("test",))["test"]
    with torch.no_grad():
        expected = torch.cat([torch.softmax(model(x, mask), dim=1) for x, _, mask in loader]).numpy()
    _, predicted = evaluate_predictions(model, loader, torch.device("cpu"))
    records = [str(sample_dir / f"{name}.hea") for name in loader.dataset.names]
    assert predict.main([str(exported_model[1]), *records, "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert [p["record"] for p in output["predictions"]] == records and output["failed"] == []
    assert [p["predicted"] for p in output["predictions"]] == [CLASSES[i] for i in predicted]
    probabilities = np.array([list(p["probabilities"].values()) for p in output["predictions"]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-6)


@pytest.fixture(scope="module")
def variable_length_model(untrained_run, tmp_path_factory):
    """An untrained resnet18a_vl saved as a bucketed run reading up to 7168 samples, exported."""
    root = tmp_path_factory.mktemp("vl")
    run = untrained_run(root / "VL", 0, "--model", "resnet18a_vl", "--bucket", "--max_length", "7168",
                        "--random_pad", "1024")
    assert export.main([str(run), str(root / "model")]) == 0
    return root / "model"


def test_bucketed_records_of_several_lengths_come_back_in_the_order_given(variable_length_model, sample_dir,
                                                                          sample_test_split, capsys):
    """resnet18a_vl in bucketed batches (by length, 5000 to 7168 samples here) against the same records
    fully padded, one batch in split order: its logits do not depend on the padding."""
    model = from_pretrained(variable_length_model)
    steps = model.config["preprocessing"]
    assert steps["bucket"] and steps["max_length"] == 7168
    loader = get_dataloaders(sample_test_split, eval_batch_size=9, max_length=steps["max_length"],
                             random_pad=steps["input_length"] - steps["max_length"], splits=("test",))["test"]
    with torch.no_grad():
        expected = torch.cat([torch.softmax(model(x, mask), dim=1) for x, _, mask in loader]).numpy()
    lengths = loader.dataset.lengths
    assert len(set(lengths)) > 3 and list(lengths) != sorted(lengths)
    records = [str(sample_dir / f"{name}.hea") for name in loader.dataset.names]
    assert predict.main([str(variable_length_model), *records, "--json"]) == 0
    output = json.loads(capsys.readouterr().out)
    assert [p["record"] for p in output["predictions"]] == records
    probabilities = np.array([list(p["probabilities"].values()) for p in output["predictions"]])
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_a_mat_file_reads_as_its_header_does_and_the_table_lists_every_record(exported_model, sample_dir, capsys):
    names = [str(sample_dir / name) for name in ("A0001.hea", "A0001.mat", "A0004.hea")]
    assert predict.main([str(exported_model[1]), *names]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert header.split() == ["record", "predicted", *CLASSES]
    assert [row.split()[0] for row in rows] == names
    assert rows[0].split()[1:] == rows[1].split()[1:]
    assert all(abs(sum(map(float, row.split()[2:])) - 1) < 0.01 for row in rows)


def test_records_the_model_cannot_take_are_one_line_each_and_the_others_run(exported_model, sample_dir, tmp_path,
                                                                             capsys):
    rng = np.random.default_rng(0)
    write_wfdb_record(tmp_path, "A9001", rng.integers(-500, 500, (12, 1000)), "AF")  # 2 s
    write_wfdb_record(tmp_path, "A9002", rng.integers(-500, 500, (13, 4000)), "AF")  # a 13th lead
    write_original_record(tmp_path, "A9003", rng.normal(size=(12, 4000)))  # the original form
    (tmp_path / "A9004.mat").write_bytes(b"not a MATLAB file")
    records = [tmp_path / "A9001.hea", sample_dir / "A0001.hea", tmp_path / "A9002.hea", tmp_path / "A9003.mat",
               tmp_path / "A9004.mat", tmp_path / "A9005.hea"]
    assert predict.main([str(exported_model[1]), *map(str, records), "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"error: {records[0]}: length 1000, shorter than the models' minimum of 2049 samples (4.1 s)",
        f"error: {records[2]}: 13 leads in header A9002.hea, expected 12",
        f"error: {records[4]}: unreadable .mat file A9004.mat (truncated or corrupt: "
        + captured.err.splitlines()[2].split("(truncated or corrupt: ", 1)[1],
        f"error: {records[5]}: header A9005.hea not found"]
    output = json.loads(captured.out)
    assert [p["record"] for p in output["predictions"]] == [str(records[1]), str(records[3])]
    assert [f["record"] for f in output["failed"]] == [str(records[i]) for i in (0, 2, 4, 5)]


def test_a_model_folder_that_cannot_be_used_is_refused_in_one_line(exported_model, sample_dir, tmp_path,
                                                                    one_error_line):
    assert predict.main([str(tmp_path), str(sample_dir / "A0001.hea")]) == 2
    assert one_error_line().startswith(f"error: {tmp_path / 'config.json'}: not found (not a model folder")


def float64_classifier(tensors):
    tensors["classifier.weight"] = tensors["classifier.weight"].double()


@pytest.mark.parametrize("change, weights, damaged, problem", [
    (lambda c: c.update(architecture=["resnet18a"]), None, "config.json", "unknown architecture ['resnet18a']"),
    (lambda c: c.update(training={}), None, "config.json", "training lacks eval_batch_size"),
    (lambda c: c["training"].update(eval_batch_size=0), None, "config.json", "training eval_batch_size 0: not a "),
    (lambda c: c["training"].update(eval_batch_size="18"), None, "config.json", "training eval_batch_size '18': not "),
    (None, float64_classifier, "model.safetensors", "tensor classifier.weight is torch.float64, the model's is "),
    (None, lambda t: t["trunk.head_conv.bias"].fill_(float("nan")), "model.safetensors",
     "tensor trunk.head_conv.bias holds values that are not finite"),
])
def test_a_damaged_model_folder_is_refused_in_one_line_naming_the_file(exported_model, sample_dir, tmp_path,
                                                                       one_error_line, change, weights, damaged,
                                                                       problem):
    folder = tampered(exported_model[1], tmp_path, change, weights)
    assert predict.main([str(folder), str(sample_dir / "A0001.hea"), "--json"]) == 2
    assert one_error_line().startswith(f"error: {folder / damaged}: {problem}")


def test_probabilities_that_are_not_finite_fail_the_record_and_the_json_stays_json(exported_model, sample_dir,
                                                                                     tmp_path, capsys):
    """Finite weights so large that the logits overflow: the softmax is NaN, which JSON cannot hold."""
    folder = tampered(exported_model[1], tmp_path, weights=lambda t: t["classifier.weight"].fill_(3e38))
    records = [str(sample_dir / "A0001.hea"), str(sample_dir / "A0004.hea")]
    assert predict.main([str(folder), *records, "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {record}: the model's probabilities are not finite (NaN or infinity)"
                                         for record in records]
    output = json.loads(captured.out, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert output["predictions"] == [] and [f["record"] for f in output["failed"]] == records


@pytest.mark.slow  # a process of its own (importing torch)
def test_a_hub_repository_id_is_read_from_the_hub_cache_with_hf_hub_offline(exported_model, sample_dir, tmp_path):
    """A process of its own, so that huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported."""
    hub_cache(tmp_path / "hub", "ecg-lab/resnet18a-ce", exported_model[1])
    record = str(sample_dir / "A0001.hea")
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    done = subprocess.run([sys.executable, "predict.py", "ecg-lab/resnet18a-ce", record, "--json"], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    [prediction] = json.loads(done.stdout)["predictions"]
    here = predict.predict_records(from_pretrained(exported_model[1]), [sample_dir / "A0001.hea"], torch.device("cpu"))
    assert prediction == here[0][0]  # the model folder itself, in this process
