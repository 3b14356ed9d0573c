"""The whole chain on the real records of data/sample: preprocess, a tiny CE training, evaluation.

With 2 records per class the sample fills train and validation only (1 each per class), so
the chain evaluates on the validation split."""
import json

import numpy as np
import pytest

import evaluate
from training import harness
import preprocess
from reproduce import SCRIPTS


@pytest.mark.slow
def test_preprocess_train_and_evaluate_on_the_real_sample(sample_dir, tmp_path, capsys):
    cache, results = tmp_path / "processed", tmp_path / "result"
    assert preprocess.main(["--raw-dir", str(sample_dir), "--out-dir", str(cache),
                            "--val-per-class", "1", "--test-per-class", "0"]) == 0
    assert "read 18 CPSC2018 records (wfdb form)" in capsys.readouterr().out

    script = SCRIPTS["CE"]
    argv = ["--preset", "smoke", "--data_dir", str(cache), "--result_dir", str(results),
            "--max_length", "2048", "--random_pad", "1024", "--batch_size", "6", "--eval_batch_size", "9",
            "--epochs", "1", "--max_batches", "2", "--sweeps", ""]
    assert harness.main(script, argv=argv) == 0
    run = results / "CE"
    history = json.loads((run / "history.json").read_text())
    assert len(history) == 1 and np.isfinite(history[0]["loss"]) and 0 <= history[0]["val_accuracy"] <= 1

    assert evaluate.main([str(run), "--split", "val", "--sweeps", "white,pgd_linf", "--sweep_steps", "2",
                          "--sweep_restarts", "1"]) == 0
    clean = json.loads((run / "eval_val.json").read_text())["clean"]
    assert clean["n"] == 9 and 0 <= clean["accuracy"] <= 1
    sweeps = json.loads((run / "robustness_val.json").read_text())["sweeps"]
    assert set(sweeps) == {"white", "pgd_linf"}
    assert all(0 <= accuracy <= 1 for sweep in sweeps.values() for accuracy in sweep["accuracy"])
