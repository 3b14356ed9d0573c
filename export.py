"""Export a trained run as a model folder that the Hugging Face Hub, RobustBench-style tables and
other code can read, and that ``ECG_CNN.from_pretrained`` loads back (docs/USAGE.md, "Sharing a model").

    python export.py result/CE models/CE
    python export.py result/advls_eps_0.01_beta_0.5 models/advls --eps 0.03 --overwrite

Writes into OUT_DIR only: model.safetensors and config.json (plumbing/pretrained.py), README.md
(a model card: YAML front matter in the Hub's conventions, then what the model is for, its data,
method and the run's evaluation tables) and, when the run has an ``autoattack`` sweep,
robustness.json (a RobustBench-style entry at --eps). The numbers are those evaluate.py and
certify.py wrote into the run folder; nothing here runs the model. A result file older than the
run's model.pt (an earlier model's) is left out, named in one line. A run without a finished model
(model.pt) is refused, and so is a non-empty OUT_DIR unless --overwrite (which replaces an earlier
export only).
"""
from __future__ import annotations

import ast
import sys
import time
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

from analysis.compare import (EvaluationError, certificate_problem, masking_check, masking_check_markdown,
                              older_than_model, read_certificate, read_clean, read_sweeps, sweep_table)
from analysis.metrics import SWEEP_METRICS, scores_table, to_markdown
from perturbations.autoattack import ENSEMBLE_VERSIONS
from config import METHODS, PRESETS, SWEEPS, TRAIN_DEFAULTS, Sweep
from databases.cpsc2018 import CLASSES
from evaluate import load_model
from plumbing import pretrained
from plumbing.flags import ConfigError, OneLineParser, folder
from plumbing.safe_writes import LOCK_NAME, FolderInUseError, lock_folder, read_json, write_json, write_text_atomic
from preprocess import MIN_RECORD_LENGTH

CARD_FILE = "README.md"
ROBUSTNESS_FILE = "robustness.json"
EXPORT_FILES = (pretrained.WEIGHTS_FILE, pretrained.CONFIG_FILE, CARD_FILE, ROBUSTNESS_FILE)
AUTOATTACK_SWEEP = "autoattack"
# An autoattack sweep that names no ensemble_version was written before the standard line-up
# existed: it ran the fast one.
UNNAMED_AUTOATTACK_VERSION = "fast"
DEFAULT_LICENSE = "cc-by-4.0"  # the PhysioNet/CinC redistribution of CPSC2018 is CC BY 4.0
DEFAULT_EPS = 0.01  # robustness.json's L-inf budget: the paper's adversarial-training eps, in every level list
LEVEL_SLACK = 1e-12  # levels read back from JSON
PAPER = ("L. Ma and L. Liang, \"Enhance CNN Robustness Against Noises for Classification of 12-Lead ECG with "
         "Variable Length\", ICMLA 2020 (arXiv:2008.03609)")
PAPER_URL = "https://arxiv.org/abs/2008.03609"
CITATION = """@inproceedings{ma2020enhance,
  title     = {Enhance {CNN} Robustness Against Noises for Classification of 12-Lead {ECG} with Variable Length},
  author    = {Ma, Linhai and Liang, Liang},
  booktitle = {19th IEEE International Conference on Machine Learning and Applications (ICMLA)},
  year      = {2020},
  eprint    = {2008.03609},
  archivePrefix = {arXiv}
}"""
# The training settings that describe a run's inputs and schedule (the rest: config.json's "training").
SCHEDULE_KEYS = ("model", "epochs", "batch_size", "lr", "seed", "max_length", "random_pad", "bucket")
# What a run's saved settings hold besides TRAIN_DEFAULTS' and its method's hyperparameters.
RUN_RECORD_KEYS = ("method", "preset", "data_fingerprint", "stopped_early")
# Training settings outside the method's that change what the model learns when set (non-zero).
TRAINING_EXTRAS = ("noise_sd",)


class ExportError(Exception):
    """The run or OUT_DIR cannot be exported to; the message names it."""


# --- what the run holds ----------------------------------------------------------------------

def finished_model(run_dir: Path):
    """(model, its saved settings) of the run folder's model.pt; ExportError without one."""
    if not run_dir.is_dir():
        raise ExportError(f"{run_dir}: no such run folder")
    if not (run_dir / "model.pt").is_file():
        raise ExportError(f"{run_dir}: no finished model (no model.pt: the run has not finished training)")
    try:
        return load_model(run_dir)
    except EvaluationError as error:
        raise ExportError(str(error)) from None


def read_results(run_dir: Path, split: str) -> tuple[dict, list[str]]:
    """(the run's evaluation on ``split``, a note on each result file left out). The evaluation:
    "clean" (or None) and "sweeps" ({} when none) as evaluate.py wrote them, and "certified"
    ({sigma: its (radius, certified accuracy) rows}) from certify.py's certify_<sigma>.json files
    of ``split``. A result file older than the run's model.pt is that of an earlier model: left out."""
    notes = []

    def current(path: Path) -> bool:
        if not older_than_model(path, run_dir):
            return True
        notes.append(f"{path}: older than the run's model.pt (evaluate or certify the run again)")
        return False

    clean_file, sweeps_file = run_dir / f"eval_{split}.json", run_dir / f"robustness_{split}.json"
    try:
        results = {"clean": read_clean(clean_file) if clean_file.is_file() and current(clean_file) else None,
                   "sweeps": read_sweeps(sweeps_file) if sweeps_file.is_file() and current(sweeps_file) else {},
                   "certified": {}}
        certificates = [(path, read_certificate(path)) for path in sorted(run_dir.glob("certify_*.json"))
                        if current(path)]
    except EvaluationError as error:
        raise ExportError(str(error)) from None
    version = autoattack_version(results["sweeps"].get(AUTOATTACK_SWEEP, {}))
    if not isinstance(version, str) or version not in ENSEMBLE_VERSIONS:
        raise ExportError(f"{sweeps_file}: '{AUTOATTACK_SWEEP}' ran an unknown ensemble_version {version!r} "
                          f"({', '.join(ENSEMBLE_VERSIONS)}): evaluate the run again")
    for path, content in sorted(certificates, key=lambda item: item[1]["settings"]["sigma"]):
        problem = certificate_problem(path, content, run_dir, split)  # the split: current() took the rest
        if problem:
            notes.append(f"{path}: {problem}")
            continue
        table = content["certified_accuracy"]
        results["certified"][f"{content['settings']['sigma']:g}"] = list(zip(table["radii"], table["accuracy"]))
    return results, notes


def autoattack_version(sweep: dict) -> str:
    return sweep.get("ensemble_version", UNNAMED_AUTOATTACK_VERSION)


def sweep_entry(name: str, sweep: dict) -> Sweep | None:
    """The SWEEPS entry that produced ``sweep``: an autoattack sweep by the version it ran."""
    if name == AUTOATTACK_SWEEP:
        return next(entry for entry in SWEEPS.values() if entry.ensemble == autoattack_version(sweep))
    return SWEEPS.get(name)


def accuracy_at(sweep: dict, eps: float) -> float | None:
    """The sweep's accuracy at level ``eps``; None when it has no such level."""
    for level, accuracy in zip(sweep["levels"], sweep["accuracy"]):
        if level is not None and abs(level - eps) <= LEVEL_SLACK:
            return accuracy
    return None


def method_text(method: str) -> str:
    """What the method does: its script's docstring without the usage lines and the note on flags."""
    script = Path(__file__).resolve().parent / f"{METHODS[method].script}.py"
    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    paragraphs = [p for p in docstring.split("\n\n") if not p.lstrip().startswith(("python ", "Every setting is a flag"))]
    return "\n\n".join(" ".join(p.split()) for p in paragraphs)


def data_text(settings: dict) -> str:
    """What the model was trained on: the preset's statement of its data, the cache's counts."""
    preset = PRESETS.get(settings.get("preset", ""))
    lines = [preset.data_note if preset else
             f"Trained on the preprocessed cache {settings['data_dir']} (not one of the presets' data)."]
    meta = read_json(Path(settings["data_dir"]) / "meta.json")
    if isinstance(meta, dict) and isinstance(meta.get("class_counts"), dict):
        counts = meta["class_counts"]
        lines += ["", f"The cache ({meta.get('n_records')} records, {meta.get('source_format')} form) split "
                      f"into train, validation and test, records per class:", "",
                  "| split | " + " | ".join(CLASSES) + " |", "|---|" + "---|" * len(CLASSES)]
        lines += [f"| {name} | " + " | ".join(str(counts[name].get(c, 0)) for c in CLASSES) + " |"
                  for name in ("train", "val", "test") if isinstance(counts.get(name), dict)]
    else:
        lines += ["", f"The cache {settings['data_dir']} was not at hand when the model was exported: its "
                      "record counts are not shown."]
    fingerprint = settings.get("data_fingerprint")
    if isinstance(fingerprint, dict):
        lines += ["", "Data fingerprint of the training run: " + ", ".join(f"{k} {v}" for k, v in fingerprint.items())
                  + "."]
    return "\n".join(lines)


def stopped_text(stopped) -> str:
    """The sentence (and a line break) on the epoch the weights come from when the run's guard
    stopped it early (training.harness.stop_collapsed's record); "" otherwise."""
    if not isinstance(stopped, dict):
        return ""
    return (f"Training stopped early at epoch {stopped.get('epoch')} (catastrophic overfitting); the weights are "
            f"epoch {stopped.get('best_epoch')}'s, the best guard accuracy {stopped.get('best_guard_accuracy'):.3f}.\n")


def is_synthetic(settings: dict) -> bool:
    preset = PRESETS.get(settings.get("preset", ""))
    return bool(preset and preset.synthetic_records_per_class)


def dataset(settings: dict) -> tuple[str, str]:
    """(id, name) of the data the run trained and was evaluated on, for the card's and robustness.json's fields."""
    return ("synthetic-ecg", "synthetic ECGs (synthetic.py)") if is_synthetic(settings) else ("cpsc2018", "CPSC2018")


# --- the files -------------------------------------------------------------------------------

def model_config(model, settings: dict, run_config: dict) -> dict:
    """config.json: the architecture, classes, preprocessing and the run's training settings."""
    steps = pretrained.preprocessing(settings["max_length"], settings["max_length"] + settings["random_pad"],
                                     settings["bucket"])
    return {"format": pretrained.FORMAT, "format_version": pretrained.FORMAT_VERSION,
            "architecture": settings["model"],
            "architecture_args": {"in_leads": len(steps["leads"]), "num_classes": len(CLASSES)},
            "classes": list(CLASSES),
            "preprocessing": steps,
            "training": settings,
            "source": {key: run_config[key] for key in ("git_commit", "torch", "command", "started")
                       if key in run_config} | {"exported": time.strftime("%Y-%m-%d %H:%M:%S")},
            "num_parameters": sum(p.numel() for p in model.parameters())}


def robustness_entry(settings: dict, sweep: dict, eps: float, split: str) -> dict:
    """robustness.json: a RobustBench-style entry of the run's autoattack sweep at ``eps``
    (accuracies in percent as strings, as RobustBench writes them)."""
    version = autoattack_version(sweep)
    robust = accuracy_at(sweep, eps)
    return {"name": f"{settings['run_name']} ({settings['method']}, {settings['model']})",
            "link": PAPER_URL, "dataset": dataset(settings)[0],
            "threat_model": "Linf", "eps": f"{eps:g}",
            "eps_scale": "model input: each lead divided by its peak |mV|, values in [-1, 1]",
            "clean_acc": f"{100 * sweep['accuracy'][0]:.2f}", "autoattack_acc": f"{100 * robust:.2f}",
            "autoattack_version": version,
            "attacks": list(ENSEMBLE_VERSIONS[version]),
            "attack_settings": {**sweep["settings"], "description": sweep_entry(AUTOATTACK_SWEEP, sweep).describe(sweep["settings"])},
            "metric": "class-balanced accuracy", "split": split, "n_records": sweep["n"],
            "architecture": f"{settings['model']} (1D CNN, ECG_CNN.py)", "number_forward_passes": 1,
            "additional_data": False}


def eval_results(settings: dict, results: dict, eps: float, split: str) -> list[EvalResult]:
    """The model-index entries: clean accuracy and mean F1, PGD and AutoAttack accuracy at ``eps``,
    certified accuracy at each radius."""
    data_id, data_name = dataset(settings)
    task = dict(task_type="time-series-classification", task_name="12-lead ECG classification",
                dataset_type=data_id, dataset_name=data_name, dataset_split=split)
    entries = []
    if results["clean"]:
        entries += [EvalResult(**task, metric_type="accuracy", metric_name="class-balanced accuracy (clean)",
                               metric_value=round(results["clean"]["accuracy"], 4)),
                    EvalResult(**task, metric_type="f1", metric_name="mean F1 (clean)",
                               metric_value=round(results["clean"]["mean_f1"], 4))]
    for name in ("pgd_linf", AUTOATTACK_SWEEP):
        sweep = results["sweeps"].get(name)
        robust = accuracy_at(sweep, eps) if sweep else None
        if robust is not None:
            entries.append(EvalResult(**task, metric_type="accuracy",
                                      metric_name=f"class-balanced accuracy under {sweep_entry(name, sweep).title} eps={eps:g}",
                                      metric_value=round(robust, 4)))
    for sigma, rows in results["certified"].items():
        entries += [EvalResult(**task, metric_type="accuracy",
                               metric_name=f"certified accuracy, sigma={sigma}, L2 radius {radius:g}",
                               metric_value=round(accuracy, 4)) for radius, accuracy in rows]
    return entries


def evaluation_text(results: dict, split: str) -> str:
    """The run's evaluation tables in Markdown: clean, each sweep, the ensemble check, certified."""
    lines = []
    if results["clean"]:
        lines += [f"### Clean, {split} split ({results['clean']['n']} records)", "", scores_table(results["clean"]), ""]
    else:
        lines += [f"The run was not evaluated on its {split} split (`python evaluate.py RUN`).", ""]
    curves = {"model": results["sweeps"]}
    for name, sweep in results["sweeps"].items():
        entry = sweep_entry(name, sweep)
        lines += [f"### {entry.title if entry else name} ({sweep['n']} records)", "",
                  "Class-balanced accuracy by level (a record misclassified clean stays misclassified)"
                  + (f"; AutoAttack version: {autoattack_version(sweep)}" if name == AUTOATTACK_SWEEP else "")
                  + (f"; {entry.describe(sweep['settings'])}" if entry else "") + ".", ""]
        for metric, (_, label) in SWEEP_METRICS.items():
            lines += [f"{label}:", "", to_markdown(sweep_table(curves, name, metric)), ""]
    check = masking_check(results["sweeps"])
    if check:
        lines += ["### PGD against the ensemble (gradient-masking check)", "", masking_check_markdown({"model": check}), ""]
    for sigma, rows in results["certified"].items():
        lines += [f"### Certified accuracy (randomized smoothing, sigma {sigma})", "", "| L2 radius | certified accuracy |",
                  "|---|---|", *(f"| {radius:g} | {accuracy:.3f} |" for radius, accuracy in rows), ""]
    return "\n".join(lines)


def model_card(config: dict, results: dict, eps: float, split: str, license_name: str) -> str:
    """README.md: YAML front matter (Hub conventions, model-index) and the card's prose."""
    settings = config["training"]
    name = settings["run_name"]
    synthetic = is_synthetic(settings)
    data = ModelCardData(
        license=license_name, library_name="pytorch", model_name=name,
        datasets=[dataset(settings)[0]], metrics=["accuracy", "f1"],
        tags=["ecg", "electrocardiogram", "12-lead-ecg", "time-series-classification", "adversarial-robustness",
              "safetensors", settings["method"], settings["model"], *(["synthetic-data"] if synthetic else [])],
        eval_results=eval_results(settings, results, eps, split) or None)
    steps = config["preprocessing"]
    schedule = ", ".join(f"{key} {settings[key]}" for key in SCHEDULE_KEYS if key in settings)
    hyperparameters = {key: value for key, value in settings.items()
                       if key not in (*TRAIN_DEFAULTS, *RUN_RECORD_KEYS, *SCHEDULE_KEYS)
                       or key in TRAINING_EXTRAS and value}
    body = f"""
# {name}: {settings['model']} trained with {settings['method']}

A 1D CNN that sorts a 12-lead ECG of variable length into one of {len(CLASSES)} classes
({', '.join(CLASSES)}), trained with the {settings['method']} method of the reproduction of {PAPER}
({PAPER_URL}).{' **Trained on synthetic signals, not on ECGs of patients.**' if synthetic else ''}

## Intended use

Research on the robustness of ECG classifiers to adversarial perturbations and noise, and on
the reproduction of the paper: comparing methods, attacking the model, building on it.

**Not for clinical use.** This model is not a medical device and has not been validated for
diagnosis, screening or any decision about a patient. Do not use its outputs for the care of anyone.

## How to use

```python
from ECG_CNN import from_pretrained   # this repository
model = from_pretrained("path/or/hub-repo-id")   # eval mode; model.config is config.json
```

```bash
python predict.py path/or/hub-repo-id A0001.hea A0002.mat   # class probabilities per record
```

Inputs (config.json's "preprocessing"): the leads {', '.join(steps['leads'])} (in this order) at
{steps['sampling_rate']} Hz in {steps['units']}; the record's first {steps['max_length']} samples, each lead
divided by its maximum absolute value, zero-padded on the {steps['padding_side']} to {steps['input_length']}
samples, with a mask of 1 on the signal: `model(x, mask)` with x of shape (batch, {len(steps['leads'])},
{steps['input_length']}) and mask (batch, 1, {steps['input_length']}) gives the logits of the classes in the
order of config.json's "classes".

## Training data and split

{data_text(settings)}

## Method

{method_text(settings['method'])}

Settings: {schedule}; method settings: {', '.join(f'{k} {v}' for k, v in hyperparameters.items()) or 'none'}.
{stopped_text(settings.get('stopped_early'))}Every setting of the run is in config.json's "training".

## Evaluation

{evaluation_text(results, split)}
Accuracy is class-balanced (the mean of the per-class sensitivities). Attacks and noise are
applied to the model input (each lead scaled to its peak), L-inf budgets in that scale.

## Limitations

- {'The training data are simulated signals: nothing here says anything about real ECGs.' if synthetic else
   'Trained and tested on CPSC2018 alone (one source of 12-lead ECGs): other devices, populations or sampling rates are untested.'}
- Records at {steps['sampling_rate']} Hz only; records longer than {steps['max_length']} samples are cut to their
  first {steps['max_length']}; records shorter than {MIN_RECORD_LENGTH} samples are not classified.
- One label per record; CPSC2018's multi-label records took part in no split.
- Robustness numbers hold for the attacks and budgets listed above, on the records evaluated;
  an adaptive or stronger attack may do better.

## Citation

{CITATION}
"""
    return f"---\n{data.to_yaml()}\n---\n{body}"


# --- the command -----------------------------------------------------------------------------

def prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse an OUT_DIR that is a link or a file, or holds anything but an earlier export (with
    --overwrite) or nothing at all."""
    if out_dir.is_symlink() or out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir}: a link or a file: the export writes into a real folder of its own")
    contents = [path.name for path in out_dir.iterdir() if path.name != LOCK_NAME] if out_dir.is_dir() else []
    if not contents:
        return
    config = read_json(out_dir / pretrained.CONFIG_FILE)
    exported = isinstance(config, dict) and config.get("format") == pretrained.FORMAT
    if not overwrite:
        raise ExportError(f"{out_dir}: not empty ({len(contents)} entries); pass --overwrite to replace "
                          "an earlier export there, or choose another OUT_DIR")
    if not exported:
        raise ExportError(f"--overwrite: {out_dir} holds no earlier export (no config.json of a model folder); "
                          "it is left alone")


def export(run_dir: Path, out_dir: Path, eps: float = DEFAULT_EPS, split: str = "test",
           license_name: str = DEFAULT_LICENSE, overwrite: bool = False) -> tuple[list[str], list[str]]:
    """Write the model folder of ``run_dir`` (its finished model and results) into ``out_dir``,
    holding its lock; returns (the names of the files written, read_results' notes on the result
    files left out). The run is read and checked before ``out_dir`` is touched (ExportError)."""
    model, settings = finished_model(run_dir)
    results, notes = read_results(run_dir, split)
    config = model_config(model, settings, read_json(run_dir / "config.json") or {})
    aa_sweep = results["sweeps"].get(AUTOATTACK_SWEEP)
    if aa_sweep and accuracy_at(aa_sweep, eps) is None:
        raise ExportError(f"--eps {eps:g}: not a level of the run's autoattack sweep ("
                          + ", ".join(f"{level:g}" for level in aa_sweep["levels"][1:]) + ")")
    card = model_card(config, results, eps, split, license_name)
    prepare_out_dir(out_dir, overwrite)
    with lock_folder(out_dir, "model folder"):
        pretrained.save_weights(model, out_dir / pretrained.WEIGHTS_FILE)
        write_json(config, out_dir / pretrained.CONFIG_FILE)
        write_text_atomic(out_dir / CARD_FILE, card)
        written = [pretrained.WEIGHTS_FILE, pretrained.CONFIG_FILE, CARD_FILE]
        if aa_sweep:
            write_json(robustness_entry(settings, aa_sweep, eps, split), out_dir / ROBUSTNESS_FILE)
            written.append(ROBUSTNESS_FILE)
        for stale in set(EXPORT_FILES) - set(written):  # an earlier export's, that this run does not have
            (out_dir / stale).unlink(missing_ok=True)
    return written, notes


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description="Export a trained run as a model folder (safetensors, config.json, "
                                       "model card, RobustBench-style entry).")
    parser.add_argument("run", help="a run folder under result/ holding the finished model.pt")
    parser.add_argument("out_dir", type=folder, help="the model folder to write (new or empty)")
    parser.add_flag("--eps", type=float, default=DEFAULT_EPS,
                    help="robustness.json's L-inf budget: a level of the run's autoattack sweep (default: %(default)s)")
    parser.add_flag("--split", default="test", choices=("test", "val"), help="the evaluation the card reports")
    parser.add_flag("--license", dest="license_name", default=DEFAULT_LICENSE,
                    help="the model card's license (a Hub license id; default: %(default)s, that of the "
                         "PhysioNet/CinC redistribution of CPSC2018 the weights derive from)")
    parser.add_flag("--overwrite", action="store_true", help="replace an earlier export in OUT_DIR")
    try:
        args = parser.parse_args(argv)
        written, notes = export(Path(args.run), Path(args.out_dir), args.eps, args.split, args.license_name, args.overwrite)
    except (ExportError, ConfigError, FolderInUseError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a file that could not be written while running
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"exported {args.run} to {args.out_dir}/: {', '.join(written)}")
    for note in notes:
        print(f"note: left out {note}")
    if ROBUSTNESS_FILE not in written:
        print(f"note: no {ROBUSTNESS_FILE}: the run has no {AUTOATTACK_SWEEP} sweep on its {args.split} split "
              f"(python evaluate.py {args.run} --sweeps {AUTOATTACK_SWEEP},...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
