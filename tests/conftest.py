"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest

from preprocess import OFFICIAL_REFERENCE

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 18 real CPSC2018 records in the repository (WFDB form, 2 per class, REFERENCE.csv)."""
    assert (SAMPLE_DIR / "REFERENCE.csv").is_file(), f"{SAMPLE_DIR} is part of the repository"
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def official_reference() -> Path:
    """The official CPSC2018 REFERENCE.csv of all 6877 records."""
    assert OFFICIAL_REFERENCE.is_file(), f"{OFFICIAL_REFERENCE} is part of the repository"
    return OFFICIAL_REFERENCE


@pytest.fixture(scope="module")
def single_thread():
    """One torch intra-op thread for a module (pytestmark = pytest.mark.usefixtures("single_thread")):
    for tiny tensors threads only add overhead, and on a shared 2-core machine oversubscribed
    threads made runs up to 20x slower. The previous setting is restored after the module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """single_thread for one test (tiny tensors in a module that also runs large ones)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A preprocessed synthetic dataset in CPSC2018's original format: 6 records per class,
    6-20 s, 1 per class for validation and 2 for test (the rest trains)."""
    from preprocess import preprocess
    from synthetic import generate_dataset

    root = tmp_path_factory.mktemp("tiny_cpsc")
    generate_dataset(root / "train", records_per_class=6, seed=0, min_seconds=6, max_seconds=20)
    preprocess(root / "train", root / "processed", val_per_class=1, test_per_class=2)
    return root / "processed"


# --- runs of the method scripts, trained once per session ------------------------------------

METHOD_RUNS = {  # script module: the run folder its default hyperparameters name
    "CPSC2018_CNN_CE": "CE",
    "CPSC2018_CNN_NSR": "NSR_beta1_1_beta2_1",
    "CPSC2018_CNN_jacob": "jacob_beta_44_proj_1",  # the smoke preset: one projection
    "CPSC2018_CNN_ce_adv_pgd_ls": "advls_eps_0.01_beta_0.5",
}

# The smoke preset cut to 2 epochs of 2 batches of 6 records on tiny_cache, with a white-noise
# and a 2-step PGD sweep: every file of a run, in seconds.
METHOD_FLAGS = ["--preset", "smoke", "--max_length", "2048", "--random_pad", "1024", "--batch_size", "6",
                "--eval_batch_size", "18", "--epochs", "2", "--max_batches", "2",
                "--sweeps", "white,pgd_linf", "--sweep_steps", "2"]


@pytest.fixture(scope="session")
def method_run(tiny_cache, tmp_path_factory):
    """method_run(script) -> (exit status, run folder) of that method script trained through
    harness.main with METHOD_FLAGS on tiny_cache: each method once per session, on first use.
    The folder is shared: copy it (shutil.copytree) before changing anything in it."""
    import importlib

    import harness

    root, runs = tmp_path_factory.mktemp("method_runs"), {}

    def run(script_name: str) -> tuple[int, Path]:
        if script_name not in runs:
            script = importlib.import_module(script_name)
            result_dir = root / script_name
            argv = [*METHOD_FLAGS, "--data_dir", str(tiny_cache), "--result_dir", str(result_dir)]
            status = harness.main(script.__name__, script.loss_fn, script.HYPERPARAMETERS, script.run_name,
                                  argv=argv, check=getattr(script, "check_hyperparameters", None),
                                  training=script.TRAINING)
            runs[script_name] = status, result_dir / METHOD_RUNS[script_name]
        return runs[script_name]

    return run


# --- runs built without training ------------------------------------------------------------

@pytest.fixture(scope="session")
def untrained_run(tiny_cache):
    """untrained_run(folder, seed=0, *flags) -> folder holding model.pt: an untrained resnet18a
    (torch seed ``seed``) with the config a tiny CE training on tiny_cache would save, as if
    trained; evaluate.py can evaluate it."""
    import torch

    import harness
    from ECG_CNN import build_model

    def make(folder: Path, seed: int = 0, *flags: str) -> Path:
        argv = ["--data_dir", str(tiny_cache), "--result_dir", str(folder.parent), "--run_name", folder.name,
                "--max_length", "2048", "--random_pad", "1024", "--batch_size", "8",
                "--eval_batch_size", "18", "--epochs", "1", "--seed", str(seed), *flags]
        config = vars(harness.parse_config("CE", {}, argv=argv))
        torch.manual_seed(seed)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model_name": config["model"], "model": build_model(config["model"]).state_dict(),
                    "config": config}, folder / "model.pt")
        return folder

    return make


WHITE = object()  # fake_run's default: one white-noise sweep


@pytest.fixture
def fake_run():
    """fake_run(folder, sweeps=..., clean=(y_true, y_pred)) -> folder holding the result files of an
    evaluation: eval_test.json with the clean scores of those predictions (default: all 9 classes
    right) and robustness_test.json with ``sweeps`` ({name: sweep result}; by default a white-noise
    sweep at accuracy and mean F1 1 on every level of the paper's list; None: no robustness_test.json)."""
    import json

    import evaluate

    def make(folder: Path, sweeps=WHITE, clean=(range(9), range(9))) -> Path:
        folder.mkdir(parents=True)
        scores = evaluate.classification_scores(evaluate.confusion_matrix(*map(list, clean)))
        (folder / "eval_test.json").write_text(json.dumps({"clean": scores}))
        if sweeps is WHITE:
            levels = [0.0, *evaluate.noise_levels("white")]
            sweeps = {"white": {"sweep": "white", "level_list": "paper", "levels": levels, "axis_levels": levels,
                                "accuracy": [1.0] * len(levels), "mean_f1": [1.0] * len(levels),
                                "auc": 1.0, "auc_f1": 1.0}}
        if sweeps is not None:
            (folder / "robustness_test.json").write_text(json.dumps({"sweeps": sweeps}))
        return folder

    return make


@pytest.fixture
def one_error_line(capsys):
    """one_error_line() -> the single line a command wrote to stderr, checked to be 'error: ...'."""
    def read() -> str:
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        return err.strip()

    return read
