"""Certified L2 robustness by randomized smoothing (Cohen, Rosenfeld and Kolter, ICML 2019;
PROTOCOL section 10).

    python certify.py result/CE --sigma 0.25 --n0 100 --n 10000 --alpha 0.001
    python certify.py result/demo/CE --sigma 0.5 --n 1000 --max_records 18   # class-balanced subset

The smoothed classifier g(x) is the class the base classifier (the run's model) predicts most
often under Gaussian noise N(0, sigma^2) added to the signal. ``certify`` returns, per record,
g's class and an L2 radius within which g provably does not change (with probability at least
1 - alpha over the noise drawn), or abstains. The command writes certify_<sigma>.json and .csv
(per record: label, smoothed prediction or abstain, radius, seconds) and certify_<sigma>.png
(certified accuracy against the L2 radius) into the run's results folder (evaluate.results_folder)
and prints the certified accuracy at CERTIFIED_RADII.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time

import numpy as np
import pandas as pd
import torch
from scipy.stats import beta, binomtest, norm
from tqdm import tqdm

import evaluate
from analysis import figures
from analysis.compare import EvaluationError, certificate_path
from analysis.metrics import certified_accuracy, certified_curve
from config import MAX_SEED, check_device
from databases.cpsc2018 import CLASSES, DataError
from ECG_Dataset import get_dataloaders
from plumbing.distributed import choose_device
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import FolderInUseError, lock_folder, write_json, write_text_atomic

ABSTAIN = -1  # the prediction of a record on which the smoothed classifier abstains
# The radii of the printed table and of the report (L2, in the model input's units).
CERTIFIED_RADII = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


# --- randomized smoothing (Cohen, Rosenfeld and Kolter 2019) -----------------------------------

def check_settings(sigma: float, n0: int, n: int, alpha: float, batch_size: int) -> None:
    """Refuse settings under which CERTIFY cannot run, naming the flag (ConfigError)."""
    if not 0 < sigma < math.inf:
        raise ConfigError(f"--sigma must be a positive finite number, got {sigma}")
    if n0 < 1:
        raise ConfigError(f"--n0 must be at least 1, got {n0}")
    if n < n0:
        raise ConfigError(f"--n must be at least --n0 ({n0}), got {n}")
    if not 0 < alpha < 1:
        raise ConfigError(f"--alpha must lie strictly between 0 and 1, got {alpha}")
    if batch_size < 1:
        raise ConfigError(f"--batch_size must be at least 1, got {batch_size}")


@torch.no_grad()
def noise_counts(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, sigma: float, num: int,
                 batch_size: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, classes) int64 on the CPU: per record, how often ``model`` (in eval mode, its mode restored
    afterwards) predicts each class on ``num`` noisy copies x + sigma * N(0, I) * mask (noise on the
    signal only: the padding stays zero), ``batch_size`` copies of one record per forward pass."""
    was_training = model.training
    model.eval()
    counts = None
    try:
        for i in range(len(x)):
            record, signal = x[i:i + 1], mask[i:i + 1]
            for start in range(0, num, batch_size):
                size = min(batch_size, num - start)
                noise = torch.randn((size, *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
                logits = model(record + sigma * noise * signal, signal.expand(size, -1, -1))
                if counts is None:  # on x's device: no read back to the host per forward pass
                    counts = torch.zeros(len(x), logits.shape[1], dtype=torch.int64, device=x.device)
                counts[i] += torch.bincount(logits.argmax(dim=1), minlength=counts.shape[1])
    finally:
        model.train(was_training)
    return counts.cpu()


def lower_confidence_bound(successes, trials: int, alpha: float) -> np.ndarray:
    """One-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion, for each count
    of ``successes`` out of ``trials``: the alpha quantile of Beta(k, trials - k + 1), 0 for k = 0."""
    successes = np.asarray(successes, dtype=np.int64)
    bound = beta.ppf(alpha, np.maximum(successes, 1), trials - successes + 1)
    return np.where(successes > 0, bound, 0.0)


def certify(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, sigma: float, n0: int = 100,
            n: int = 100_000, alpha: float = 0.001, batch_size: int = 64,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CERTIFY (Cohen, Rosenfeld and Kolter 2019, algorithm 1) for each record of a batch, for any
    ``model(x, mask)`` that returns logits: (prediction, radius).

    n0 noisy copies select the class cA the base classifier predicts most often; n further copies
    count how often it predicts cA, and pA, the one-sided (1 - alpha) Clopper-Pearson lower bound
    on that probability, gives the radius sigma * Phi^-1(pA) when pA > 1/2. Else the record is
    abstained on: prediction ABSTAIN (-1), radius 0. With probability at least 1 - alpha (over the
    noise) a returned class is the smoothed classifier's and no perturbation of the signal of L2
    norm below the radius changes it.

    The noise is N(0, sigma^2) on the signal only (``mask``: the padding stays zero), so the
    radius is the L2 norm of a perturbation of the signal, the units of the pgd_l2 sweep. The
    guarantee holds for any base classifier, a deterministic function of its input: one that
    clips its input to [-1, 1] (the range of the scaled leads, as the attacks do) is such a
    function, the noise added before the clip, and the certificate stays sound.

    Returns a (B,) int64 tensor of classes (ABSTAIN where abstaining) and a (B,) float64 tensor
    of radii, both on the CPU. ``generator`` (on x's device) draws the noise.
    """
    check_settings(sigma, n0, n, alpha, batch_size)
    selection = noise_counts(model, x, mask, sigma, n0, batch_size, generator)
    guess = selection.argmax(dim=1)
    estimation = noise_counts(model, x, mask, sigma, n, batch_size, generator)
    p_lower = lower_confidence_bound(estimation.gather(1, guess[:, None])[:, 0].numpy(), n, alpha)
    certified = p_lower >= 0.5  # Cohen et al.'s rule: abstain below one half, radius 0 at it
    radius = np.where(certified, sigma * norm.ppf(np.where(certified, p_lower, 0.5)), 0.0)
    prediction = torch.where(torch.from_numpy(certified), guess, torch.full_like(guess, ABSTAIN))
    return prediction, torch.from_numpy(radius)


def predict(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor, sigma: float, n: int = 100_000,
            alpha: float = 0.001, batch_size: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """PREDICT (Cohen, Rosenfeld and Kolter 2019): the smoothed classifier's class of each record,
    or ABSTAIN (-1). Of n noisy copies (noise as in ``certify``), the two classes predicted most
    often are compared by a two-sided binomial test of count1 out of count1 + count2 against 1/2;
    the top class is returned when its p-value is at most alpha (then, with probability at least
    1 - alpha, it is the smoothed classifier's class), else the record is abstained on.
    Returns a (B,) int64 tensor on the CPU."""
    check_settings(sigma, 1, n, alpha, batch_size)
    counts = noise_counts(model, x, mask, sigma, n, batch_size, generator)
    top2 = counts.topk(2, dim=1)
    prediction = top2.indices[:, 0].clone()
    for i, (count1, count2) in enumerate(top2.values.tolist()):
        if binomtest(count1, count1 + count2, 0.5).pvalue > alpha:
            prediction[i] = ABSTAIN
    return prediction


# --- the command -----------------------------------------------------------------------------

def certify_split(model: torch.nn.Module, dataset, records: list[int], settings: dict,
                  device: torch.device) -> list[dict]:
    """``certify`` on each record of ``dataset`` listed in ``records``, one at a time (timed), the
    noise drawn from one generator seeded with settings["seed"]: one row per record."""
    generator = torch.Generator(device=device).manual_seed(settings["seed"])
    rows = []
    for index in tqdm(records, desc=f"certify sigma {settings['sigma']:g}", mininterval=1.0):
        x, label, mask = (t.unsqueeze(0).to(device) for t in dataset[index])
        started = time.perf_counter()
        prediction, radius = certify(model, x, mask, settings["sigma"], settings["n0"], settings["n"],
                                     settings["alpha"], settings["batch_size"], generator)
        predicted, label = int(prediction[0]), int(label[0])
        rows.append({"record": dataset.names[index], "label": CLASSES[label],
                     "prediction": "abstain" if predicted == ABSTAIN else CLASSES[predicted],
                     "radius": float(radius[0]), "correct": predicted == label,
                     "seconds": round(time.perf_counter() - started, 3)})
    return rows


def table_text(table: dict) -> str:
    """The certified accuracy at each radius as two aligned lines."""
    return ("radius             " + "".join(f"{r:>7g}" for r in table["radii"]) + "\n"
            "certified accuracy " + "".join(f"{a:>7.3f}" for a in table["accuracy"]))


def parse_args(argv: list[str]):
    parser = OneLineParser(description="Certify a trained run's L2 robustness by randomized smoothing "
                                       "(Cohen, Rosenfeld and Kolter 2019; PROTOCOL section 10).")
    parser.add_argument("run", help="a run folder (its model.pt) or a checkpoint file, as for evaluate.py")
    parser.add_flag("--sigma", type=float, default=0.25, help="the noise's standard deviation (input units)")
    parser.add_flag("--n0", type=int, default=100, help="noisy copies per record that select the class")
    parser.add_flag("--n", type=int, default=100_000, help="noisy copies per record that bound its probability")
    parser.add_flag("--alpha", type=float, default=0.001, help="failure probability of each certificate")
    parser.add_flag("--batch_size", type=int, default=64, help="noisy copies per forward pass")
    parser.add_flag("--max_records", type=int, default=0,
                    help="a fixed class-balanced subset of this many records (0: the whole split)")
    parser.add_flag("--split", default="test", choices=("test", "val"))
    parser.add_flag("--seed", type=int, default=0, help="seeds the noise")
    parser.add_flag("--data_dir", type=folder, help="override the run's data cache folder")
    parser.add_flag("--device", help="default: the run's")
    args = parser.parse_args(argv)
    check_settings(args.sigma, args.n0, args.n, args.alpha, args.batch_size)
    if args.max_records < 0:
        raise ConfigError(f"--max_records must be >= 0, got {args.max_records}")
    if not 0 <= args.seed <= MAX_SEED:
        raise ConfigError(f"--seed must be between 0 and {MAX_SEED}, got {args.seed}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with contextlib.ExitStack() as locks:
        try:
            args = parse_args(argv)
            checkpoint = evaluate.checkpoint_file(args.run)
            model, config = evaluate.load_model(checkpoint)
            device_name = args.device or config["device"]
            check_device(device_name)
            device = choose_device(device_name)
            out_dir = evaluate.results_folder(checkpoint)
            locks.enter_context(lock_folder(out_dir, "run folder"))
            loader = get_dataloaders(args.data_dir or config["data_dir"], eval_batch_size=1,
                                     max_length=config["max_length"], random_pad=config["random_pad"],
                                     splits=(args.split,))[args.split]
            records = evaluate.balanced_records(loader.dataset.labels, args.max_records)
            settings = {"sigma": args.sigma, "n0": args.n0, "n": args.n, "alpha": args.alpha,
                        "batch_size": args.batch_size, "max_records": args.max_records, "seed": args.seed,
                        "split": args.split, "device": str(device),
                        "data_dir": args.data_dir or config["data_dir"]}
            started = time.perf_counter()
            rows = certify_split(model.to(device), loader.dataset, records, settings, device)
            seconds = time.perf_counter() - started
            radius, correct = [r["radius"] for r in rows], [r["correct"] for r in rows]
            table = {"radii": list(CERTIFIED_RADII), "accuracy": certified_accuracy(radius, correct, CERTIFIED_RADII)}
            abstained = sum(r["prediction"] == "abstain" for r in rows)
            path = certificate_path(out_dir, args.sigma)
            run = config["run_name"]
            write_json({"run": str(out_dir), "checkpoint": str(checkpoint), "method": "randomized smoothing "
                        "(Cohen, Rosenfeld and Kolter 2019), Gaussian noise on the signal, L2 radius",
                        "settings": settings, "n": len(rows), "abstained": abstained,
                        "certified_accuracy": table, "seconds": round(seconds, 3),
                        "records_per_second": round(len(rows) / seconds, 4) if seconds else None,
                        "records": rows}, path)
            write_text_atomic(path.with_suffix(".csv"), pd.DataFrame(rows).to_csv(index=False))
            figures.certified_accuracy_figure({f"sigma {args.sigma:g}": {run: certified_curve(radius, correct)}},
                                              path.with_suffix(".png"),
                                              f"{run}: {args.split} split, {len(rows)} records, n={args.n}, "
                                              f"alpha={args.alpha:g}")
            print(f"\n{run}: certified accuracy on the {args.split} split ({len(rows)} records, sigma "
                  f"{args.sigma:g}, n0 {args.n0}, n {args.n}, alpha {args.alpha:g}; {abstained} abstained; "
                  f"{seconds:.1f} s)\n{table_text(table)}\nwritten to {path} and its .csv and .png")
        except (EvaluationError, DataError, ConfigError, FolderInUseError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except OSError as error:  # a file that could not be written while running
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
