"""Fixtures shared by the test modules."""

import fcntl
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import evaluate
import export
from analysis.metrics import classification_scores, confusion_matrix
from config import noise_levels, parse_config
from databases.cpsc2018 import OFFICIAL_REFERENCE
from ECG_CNN import build_model
from helpers import PAPER_TRAINING, TINY_MAX_LENGTH, TINY_RANDOM_PAD, TinyCNN, run_reproduce, sinusoid_task
from preprocess import preprocess
from databases.synthetic import generate_dataset

# One torch thread here and in every process a test starts: the tests' tensors are small, and on
# a 2-core machine a second thread per process oversubscribes the cores and slows every run.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

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


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A preprocessed synthetic dataset in CPSC2018's original format: 6 records per class,
    6-20 s, 1 per class for validation and 2 for test (the rest trains)."""
    root = tmp_path_factory.mktemp("tiny_cpsc")
    generate_dataset(root / "train", records_per_class=6, seed=0, min_seconds=6, max_seconds=20)
    preprocess(root / "train", root / "processed", val_per_class=1, test_per_class=2)
    return root / "processed"


@pytest.fixture(scope="session")
def trained_tiny():
    """(model, x, y, mask): a TinyCNN trained for about a second to near-perfect accuracy on
    helpers.sinusoid_task, in eval mode, and a held-out batch of that task. The model is shared:
    a test that needs its parameters' .grad empty clears them, and one that changes its mode
    restores it."""
    torch.manual_seed(0)
    model = TinyCNN()
    x, y, mask = sinusoid_task(512, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(120):
        batch = slice((step * 64) % 512, (step * 64) % 512 + 64)
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch], mask[batch]), y[batch]).backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    x_test, y_test, mask_test = sinusoid_task(64, seed=2)
    with torch.no_grad():
        accuracy = (model(x_test, mask_test).argmax(1) == y_test).float().mean().item()
    assert accuracy > 0.95, f"the tiny CNN did not learn the sinusoid task ({accuracy:.2f})"
    return model, x_test, y_test, mask_test


# --- the smoke chain: every method end to end, once per test session ---------------------------

def built_once(request, tmp_path_factory, name: str, build) -> Path:
    """build(folder) once per test session. Under pytest-xdist the first worker to get here
    builds it in the folder all workers share, while the others wait for it and reuse it (or,
    if it failed, fail at once rather than build it again)."""
    if not hasattr(request.config, "workerinput"):  # not an xdist worker
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    shared = tmp_path_factory.getbasetemp().parent  # this session's, common to its workers
    folder = shared / name
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (shared / f"{name}.failed").exists():
            pytest.fail(f"building {name} failed on another worker: {(shared / f'{name}.failed').read_text()}")
        if not (folder / ".built").exists():
            folder.mkdir()
            try:
                build(folder)
            except BaseException as error:
                (shared / f"{name}.failed").write_text(f"{type(error).__name__}: {error}"[:3000])
                raise
            (folder / ".built").write_text("")
    return folder


@pytest.fixture(scope="session")
def smoke_chain(request, tmp_path_factory) -> tuple[Path, SimpleNamespace, SimpleNamespace]:
    """`python reproduce.py --preset smoke` run twice in an empty folder, each a process of its
    own: (that folder, first, second), each with the process's returncode, stdout and stderr.
    Its runs are the method scripts' end-to-end runs (test_methods.py); read, never change them."""
    def build(folder: Path) -> None:
        (folder / "chain").mkdir()
        for name in ("first", "second"):
            done = run_reproduce(folder / "chain", "--preset", "smoke")
            assert done.returncode == 0, done.stderr[-3000:]
            (folder / f"{name}.json").write_text(json.dumps(
                {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}))

    folder = built_once(request, tmp_path_factory, "smoke_chain", build)
    first, second = (SimpleNamespace(**json.loads((folder / f"{name}.json").read_text()))
                     for name in ("first", "second"))
    return folder / "chain", first, second


# --- runs built without training ------------------------------------------------------------

@pytest.fixture(scope="session")
def untrained_run(tiny_cache):
    """untrained_run(folder, seed=0, *flags) -> folder holding model.pt: an untrained resnet18a
    (torch seed ``seed``) with the config a tiny CE training on tiny_cache would save, as if
    trained; evaluate.py can evaluate it."""
    def make(folder: Path, seed: int = 0, *flags: str) -> Path:
        argv = ["--data_dir", str(tiny_cache), "--result_dir", str(folder.parent), "--run_name", folder.name,
                "--max_length", str(TINY_MAX_LENGTH), "--random_pad", str(TINY_RANDOM_PAD), "--batch_size", "8",
                "--eval_batch_size", "18", "--epochs", "1", "--seed", str(seed), *flags]
        config = vars(parse_config("CE", {}, argv=argv, training=PAPER_TRAINING))
        torch.manual_seed(seed)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"model_name": config["model"], "model": build_model(config["model"]).state_dict(),
                    "config": config}, folder / "model.pt")
        return folder

    return make


@pytest.fixture(scope="session")
def two_runs(untrained_run, tmp_path_factory):
    """Two runs A and B of tiny_cache (untrained resnet18a's of seeds 0 and 1 saved as trained CE
    runs), each evaluated by the command line with a white-noise and a 1-step PGD sweep."""
    root = tmp_path_factory.mktemp("runs")
    for name, seed in [("A", 0), ("B", 1)]:
        untrained_run(root / name, seed, "--sweeps", "white,pgd_linf", "--sweep_steps", "1",
                      "--sweep_restarts", "1")
        assert evaluate.main([str(root / name)]) == 0  # the run's own sweeps
    return root


@pytest.fixture(scope="session")
def exported_model(untrained_run, tmp_path_factory) -> tuple[Path, Path]:
    """(run folder, model folder): an untrained_run (resnet18a, no results) exported by export.py.
    Read it, never change it (copy it first)."""
    root = tmp_path_factory.mktemp("exported")
    run = untrained_run(root / "CE")
    assert export.main([str(run), str(root / "model")]) == 0
    return run, root / "model"


WHITE = object()  # fake_run's default: one white-noise sweep


@pytest.fixture
def fake_run():
    """fake_run(folder, sweeps=..., clean=(y_true, y_pred)) -> folder holding the result files of an
    evaluation: eval_test.json with the clean scores of those predictions (default: all 9 classes
    right) and robustness_test.json with ``sweeps`` ({name: sweep result}; by default a white-noise
    sweep at accuracy and mean F1 1 on every level of the paper's list; None: no robustness_test.json)."""
    def make(folder: Path, sweeps=WHITE, clean=(range(9), range(9))) -> Path:
        folder.mkdir(parents=True)
        scores = classification_scores(confusion_matrix(*map(list, clean)))
        (folder / "eval_test.json").write_text(json.dumps({"clean": scores}))
        if sweeps is WHITE:
            levels = [0.0, *noise_levels("white")]
            sweeps = {"white": {"sweep": "white", "level_list": "paper", "levels": levels, "axis_levels": levels,
                                "accuracy": [1.0] * len(levels), "mean_f1": [1.0] * len(levels),
                                "auc": 1.0, "auc_f1": 1.0, "n": 9,
                                "settings": {"steps": 0, "restarts": 1, "max_batches": 0, "seed": 0}}}
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
