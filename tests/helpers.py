"""Small models, masks, tasks and CPSC2018 record files that several test modules build their cases from."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import resource
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import scipy.io
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from analysis.metrics import certified_accuracy
from certify import CERTIFIED_RADII
from databases.cpsc2018 import CLASSES, LEAD_NAMES

REPO = Path(__file__).resolve().parents[1]  # the repository root
# The input of conftest's untrained_run: records truncated to TINY_MAX_LENGTH samples, then
# padded by TINY_RANDOM_PAD
TINY_MAX_LENGTH, TINY_RANDOM_PAD = 2048, 1024

# PROTOCOL section 5: the shared settings that every method script sets at its top (TRAINING).
PAPER_TRAINING = dict(epochs=70, batch_size=64, lr=1e-3)

def script_with(module, **parts):
    """A method script as harness.main reads it, with some of its parts replaced (a test's loss)."""
    return SimpleNamespace(**{**vars(module), **parts})


SMOKE_RUNS = {  # method: its run folder in the smoke chain (conftest's smoke_chain)
    "CE": "CE", "NSR": "NSR_beta1_1_beta2_1", "jacob": "jacob_beta_44_proj_1", "advls": "advls_eps_0.01_beta_0.5"}


class LinearModel(nn.Module):
    """logits_k = <W_k, x * mask> + b_k: input gradients (W_k * mask) and every attack quantity
    have closed forms."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight)  # (classes, leads, T)
        self.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype) if bias is None else bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.einsum("blt,klt->bk", x * mask, self.weight) + self.bias


class TinyCNN(nn.Module):
    """Two convolutions, masked mean pooling over time, a linear classifier: nonlinear, trains in
    about a second."""

    def __init__(self, leads: int = 2, classes: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv1d(leads, width, 9, padding=4)
        self.conv2 = nn.Conv1d(width, width, 9, padding=4)
        self.classifier = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.classifier((h * mask).sum(dim=2) / mask.sum(dim=2).clamp_min(1))


def right_aligned_masks(lengths: list[int], total: int, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, T) masks with each signal in the last ``length`` samples (PROTOCOL section 3)."""
    positions = torch.arange(total)
    return torch.stack([(positions >= total - n).to(dtype)[None] for n in lengths])


def generator(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``: a test's random draws, independent of the global RNG."""
    return torch.Generator().manual_seed(seed)


def predictions(model: nn.Module, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The predicted class of each sample."""
    with torch.no_grad():
        return model(x, mask).argmax(dim=1)


def binary_linear_problem(lengths: list[int], total: int = 64, seed: int = 0
                          ) -> tuple[LinearModel, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 2-class linear model on 2 leads with small inputs (no clipping within eps <= 0.5)."""
    g = torch.Generator().manual_seed(seed)
    model = LinearModel(torch.randn(2, 2, total, generator=g), torch.randn(2, generator=g))
    mask = right_aligned_masks(lengths, total)
    x = 0.3 * (2 * torch.rand(len(lengths), 2, total, generator=g) - 1) * mask
    y = torch.tensor([i % 2 for i in range(len(lengths))])
    return model, x, y, mask


def per_sample_norms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L-inf, L2) norm of each sample's perturbation."""
    flat = delta.flatten(1)
    return flat.abs().max(dim=1).values, flat.norm(dim=1)


class RecordingModel(nn.Module):
    """Wraps a model and records every input it sees while gradients are enabled."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.iterates: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.iterates.append(x.detach().clone())
        return self.model(x, mask)


def sinusoid_task(n: int, total: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, mask) of ``n`` samples: three classes told apart by the period (32, 16, 8 samples) of
    a noisy 2-lead sinusoid, random lengths T/2..T, right-aligned and zero-padded."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    periods = torch.tensor([32.0, 16.0, 8.0])[y]
    amplitude = 0.4 + 0.5 * torch.rand(n, 1, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
    t = torch.arange(total, dtype=torch.float32)
    lead_shift = torch.tensor([0.0, 1.0])[None, :, None]
    x = amplitude * torch.sin(2 * math.pi * t / periods[:, None, None] + phase + lead_shift)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    lengths = torch.randint(total // 2, total + 1, (n,), generator=g).tolist()
    mask = right_aligned_masks(lengths, total)
    return (x * mask).clamp(-1, 1), y, mask


def weights(path: Path) -> dict:
    """The model weights (state dict) saved in a model.pt or a checkpoint file."""
    return torch.load(path, weights_only=True)["model"]


def run_script(path: Path, *args: str, capture: bool = True) -> tuple[int, str, str]:
    """Run a script's ``__main__`` block in this process as ``python path args`` would, without
    the seconds a new interpreter spends importing torch: (exit status, stdout, stderr), the
    streams empty unless captured."""
    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, [str(path), *args]
    try:
        with contextlib.ExitStack() as streams:
            if capture:
                streams.enter_context(contextlib.redirect_stdout(out))
                streams.enter_context(contextlib.redirect_stderr(err))
            runpy.run_path(str(path), run_name="__main__")
        status = 0
    except SystemExit as exit:  # what the interpreter makes of it
        status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
    finally:
        sys.argv = argv
    return status, out.getvalue(), err.getvalue()


def run_reproduce(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    """``python reproduce.py flags`` in the folder ``cwd``, its output captured."""
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *flags], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@contextlib.contextmanager
def file_size_limit(size: int):
    """Within the block, a write that would make a file larger than ``size`` bytes fails with
    EFBIG, as on a full disk (``ulimit -f``, with SIGXFSZ ignored so that the write fails
    instead of killing the process)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# --- certify.py's results ---------------------------------------------------------------------

def certificate(radii_and_correct: list[tuple[float, bool]], sigma: float = 0.25, n0: int = 4, n: int = 16,
                max_records: int = 9) -> dict:
    """The content of a certify_<sigma>.json as certify.py writes it, for records with these (radius,
    correct) and these settings (alpha 0.001, the test split)."""
    records = [{"record": f"A{i:04d}", "label": "Normal", "prediction": "Normal" if correct else "abstain",
                "radius": radius, "correct": correct, "seconds": 0.1}
               for i, (radius, correct) in enumerate(radii_and_correct)]
    radii = list(CERTIFIED_RADII)
    return {"settings": {"sigma": sigma, "n0": n0, "n": n, "alpha": 0.001, "max_records": max_records,
                         "split": "test"},
            "n": len(records), "abstained": sum(not correct for _, correct in radii_and_correct),
            "certified_accuracy": {"radii": radii, "accuracy": certified_accuracy(
                [r for r, _ in radii_and_correct], [c for _, c in radii_and_correct], radii)},
            "seconds": 3.0, "records": records}


# --- CPSC2018 record files (PROTOCOL section 1) -----------------------------------------------

# data/sample: 2 single-label real records per class (data/sample/LICENSE.md lists them).
SAMPLE_COUNTS = dict.fromkeys(CLASSES, 2)


def write_original_record(
    directory: Path, name: str, data: np.ndarray, sex: str = "Male", age: float = 61.0
) -> None:
    """A record in the original CPSC2018 layout: struct ECG with fields sex, age, data (PROTOCOL section 1)."""
    scipy.io.savemat(directory / f"{name}.mat", {"ECG": {"sex": sex, "age": age, "data": data}})


def write_reference(directory: Path, rows: list[tuple]) -> None:
    """REFERENCE.csv from (name, label, ...) tuples; absent labels empty."""
    lines = ["Recording,First_label,Second_label,Third_label"]
    lines += [
        ",".join([name] + [str(label) for label in labels] + [""] * (3 - len(labels)))
        for name, *labels in rows
    ]
    (directory / "REFERENCE.csv").write_text("\n".join(lines) + "\n")


def write_wfdb_record(
    directory: Path,
    name: str,
    values: np.ndarray,
    dx: str,
    gains: list[float] | None = None,
    baselines: list[int] | None = None,
    header_samples: int | None = None,
) -> None:
    """A PhysioNet/CinC 2020 record: .hea text and a MATLAB v4 .mat with int16 `val` (as the real ones)."""
    n_leads, n_samples = values.shape
    gains = gains or [1000] * n_leads
    baselines = baselines or [0] * n_leads
    lines = [
        f"{name} {n_leads} 500 {n_samples if header_samples is None else header_samples} 05-Feb-2020 11:39:16"
    ]
    lines += [
        f"{name}.mat 16+24 {gain:g}({baseline})/mV 16 0 {first} 0 0 {lead}"
        for lead, gain, baseline, first in zip(LEAD_NAMES + ("V7",), gains, baselines, values[:, 0])
    ]
    lines += ["#Age: 57", "#Sex: Female", f"#Dx: {dx}", "#Rx: Unknown", "#Hx: Unknown", "#Sx: Unknown"]
    (directory / f"{name}.hea").write_text("\n".join(lines) + "\n")
    scipy.io.savemat(directory / f"{name}.mat", {"val": values.astype(np.int16)}, format="4")


def logits_of(model: nn.Module, seed: int = 0) -> torch.Tensor:
    """The logits of a model folder's model (ECG_CNN.from_pretrained; else of input length 3072) on two
    random inputs: one filling the input, one right-aligned over its last two thirds."""
    length = model.config["preprocessing"]["input_length"] if hasattr(model, "config") else 3072
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 8, length, generator=generator) * 2 - 1
    mask = torch.ones(2, 1, length)
    mask[1, :, : length // 3] = 0
    with torch.no_grad():
        return model(x * mask, mask)


# --- the Hugging Face Hub cache ------------------------------------------------------------------

def hub_cache(cache_dir: Path, repo_id: str, folder: Path, revision: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """Lay out ``folder``'s files in ``cache_dir`` as huggingface_hub's cache holds a downloaded
    model repository: models--owner--name/ with the files' contents in blobs/ (named by digest),
    snapshots/<revision>/ linking to them and refs/main naming the revision. Returns the snapshot."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith("."):
            blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
            blob.write_bytes(path.read_bytes())
            (snapshot / path.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def tampered(folder: Path, tmp_path: Path, change=None, weights=None) -> Path:
    """A copy of the model folder ``folder`` (tmp_path / "tampered") whose config.json ``change``
    (config -> None) and whose model.safetensors ``weights`` (tensors by name -> None) altered."""
    copy = tmp_path / "tampered"
    shutil.copytree(folder, copy)
    if change:
        config = json.loads((copy / "config.json").read_text())
        change(config)
        (copy / "config.json").write_text(json.dumps(config))
    if weights:
        tensors = load_file(copy / "model.safetensors")
        weights(tensors)
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy
