"""The results of evaluated runs, read and compared: the readers of eval_<split>.json and
robustness_<split>.json (each checked to hold what is read of it), the tables of several runs, the
gradient-masking check and the folder of ``python evaluate.py compare`` (``compare_runs``).

Nothing here runs a model: the numbers are those evaluate.py wrote; the adversarial example of
the comparison, which attacks the runs' models, is evaluate.py's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analysis import figures
from analysis.metrics import NUM_CLASSES, SWEEP_METRICS, to_markdown
from config import GRADIENT_SWEEPS, SWEEPS
from databases.cpsc2018 import CLASSES
from plumbing.safe_writes import read_json, write_text_atomic

MASKING_GAP = 0.02  # ensemble accuracy this far below PGD's (2 points) flags gradient masking
ACCURACY_SLACK = 1e-9  # accuracies read back from JSON: float noise is no difference
EXAMPLE_STEM = "adversarial_example"  # the comparison's adversarial example: its .png and .json


class EvaluationError(Exception):
    """A run, checkpoint, result file or evaluation setting that cannot be used; the message names it."""


# --- gradient-masking check -------------------------------------------------------------

def _accuracy_by_level(result: dict) -> dict[float, float]:
    """{level: accuracy} of one sweep, the clean level left out."""
    return dict(zip(result["levels"][1:], result["accuracy"][1:]))


def masking_check(sweeps: dict[str, dict], pgd: str = "pgd_linf", ensemble: str = "autoattack"
                  ) -> dict | None:
    """Does PGD overstate one run's robustness? None unless the run has both sweeps.

    ``sweeps`` is a run's robustness results ({sweep name: ``robustness_sweep`` result}).
    For each level both sweeps share: the accuracy under PGD, under the ensemble, the gap
    (PGD minus ensemble) and, when the run has a Square sweep, Square's accuracy next to
    the strongest gradient attack's (the lowest accuracy among GRADIENT_SWEEPS it has). The
    run is flagged when the gap exceeds MASKING_GAP at some level, or when Square, which
    uses no gradients, ends below the gradient attacks at some level: both say that the
    gradients mislead the gradient attacks (gradient masking). Sweeps run on other records
    than PGD's (a different --sweep_max_records) are not compared.

    Returns {"rows": [{"eps", "pgd", "ensemble", "gap", "square", "gradient"}], "flagged",
    "verdict"} with the verdict in plain words; "square" and "gradient" are None without Square.
    """
    if pgd not in sweeps or ensemble not in sweeps:
        return None
    reference = sweeps[pgd]

    def comparable(name: str) -> bool:
        other = sweeps[name]
        return other["n"] == reference["n"] and other.get("records") == reference.get("records")

    if not comparable(ensemble):
        return {"rows": [], "flagged": False,
                "verdict": f"Not compared: {pgd} ran on {reference['n']} records and {ensemble} on "
                           f"{sweeps[ensemble]['n']} (run both with the same --sweep_max_records)."}
    accuracy = {name: _accuracy_by_level(sweeps[name])
                for name in dict.fromkeys((pgd, ensemble, "square", *GRADIENT_SWEEPS))
                if name in sweeps and comparable(name)}
    gradient_sweeps = [name for name in GRADIENT_SWEEPS if name in accuracy]
    rows = []
    for level in (lv for lv in accuracy[pgd] if lv in accuracy[ensemble]):
        square = accuracy.get("square", {}).get(level)
        rows.append({"eps": level, "pgd": accuracy[pgd][level], "ensemble": accuracy[ensemble][level],
                     "gap": accuracy[pgd][level] - accuracy[ensemble][level], "square": square,
                     "gradient": None if square is None else
                     min(accuracy[g][level] for g in gradient_sweeps if level in accuracy[g])})

    reasons = []
    overstated = [row for row in rows if row["gap"] > MASKING_GAP + ACCURACY_SLACK]
    if overstated:
        worst = max(overstated, key=lambda row: row["gap"])
        reasons.append(f"PGD overstates this model's robustness by {100 * worst['gap']:.1f} points at "
                       f"eps={worst['eps']:g} (accuracy {worst['pgd']:.3f} under PGD, "
                       f"{worst['ensemble']:.3f} under the ensemble); the ensemble is more than "
                       f"{100 * MASKING_GAP:g} points below PGD at eps="
                       + ", ".join(f"{row['eps']:g}" for row in overstated) + ".")
    square_wins = [row for row in rows if row["square"] is not None
                   and row["square"] < row["gradient"] - ACCURACY_SLACK]
    if square_wins:
        reasons.append("Square, which uses no gradients, does better than the gradient attacks at eps="
                       + ", ".join(f"{row['eps']:g} ({row['square']:.3f} against {row['gradient']:.3f})"
                                   for row in square_wins)
                       + ": the gradients mislead the gradient attacks.")
    verdict = " ".join(reasons) or (
        f"No sign of gradient masking: the ensemble is within {100 * MASKING_GAP:g} points of PGD at "
        "every level" + (" and Square never does better than the gradient attacks."
                         if "square" in accuracy else "."))
    return {"rows": rows, "flagged": bool(reasons), "verdict": verdict}


def masking_check_markdown(checks: dict[str, dict]) -> str:
    """The checks of several runs ({run: ``masking_check`` result}) as one Markdown table
    (class-balanced accuracy; gap in points) followed by each run's verdict."""
    def cell(value):
        return "" if value is None else f"{value:.3f}"

    lines = ["| run | eps | PGD | ensemble | gap (points) | Square | best gradient attack |",
             "|---|---|---|---|---|---|---|"]
    for run, check in checks.items():
        lines += [f"| {run} | {row['eps']:g} | {row['pgd']:.3f} | {row['ensemble']:.3f} | "
                  f"{100 * row['gap']:.1f} | {cell(row['square'])} | {cell(row['gradient'])} |"
                  for row in check["rows"]]
    lines.append("")
    lines += [f"- **{run}**: {'FLAGGED. ' if check['flagged'] else ''}{check['verdict']}"
              for run, check in checks.items()]
    return "\n".join(lines)


# --- result files ------------------------------------------------------------------------

def read_result(path: Path, key: str) -> dict:
    """The entry ``key`` of a result file's JSON object, checked to be an object (a dict) too."""
    if not path.is_file():
        raise EvaluationError(f"{path}: not found (evaluate that run first: python evaluate.py {path.parent})")
    content = read_json(path)
    if not isinstance(content, dict) or not isinstance(content.get(key), dict):
        raise EvaluationError(f"{path}: not valid JSON with a '{key}' object: not a result file of this project")
    return content[key]


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _are_numbers(values, count: int) -> bool:
    return isinstance(values, list) and len(values) == count and all(map(is_number, values))


def older_than_model(path: Path, run_dir: str | Path) -> bool:
    """Whether the result file ``path`` predates its run's model.pt: an earlier model's result
    (False when the run has no model.pt)."""
    model = Path(run_dir) / "model.pt"
    return model.is_file() and path.stat().st_mtime < model.stat().st_mtime


def certificate_problem(path: Path, certificate: dict, run_dir: str | Path, split: str) -> str | None:
    """Why certify.py's result ``path`` (``certificate``, read) is not the run's current
    certification of ``split`` (certify.py --split val writes the same file name), or None."""
    if certificate["settings"].get("split") != split:
        return f"a certification of the {certificate['settings'].get('split')} split, not of {split}"
    if older_than_model(path, run_dir):
        return "older than the run's model.pt"
    return None


def first_wrong(content: dict, checks: dict) -> str | None:
    """What is wrong with ``content`` ("'key' is value") for the first key of ``checks`` ({key: test
    of its value}) whose value fails its test; None when none does."""
    wrong = next((key for key, test in checks.items() if not test(content.get(key))), None)
    return None if wrong is None else f"'{wrong}' is {content.get(wrong)!r}"


CLEAN_CHECKS = {"f1": lambda v: _are_numbers(v, NUM_CLASSES), "n": lambda v: type(v) is int,
                **{key: is_number for key in ("accuracy", "mean_f1", "Faf", "Fblock", "Fpc", "Fst")}}
SWEEP_SETTING_KEYS = ("steps", "restarts", "max_batches", "seed")


def read_clean(path: Path) -> dict:
    """The clean metrics of an eval_<split>.json, checked to hold every number the tables show."""
    clean = read_result(path, "clean")
    wrong = first_wrong(clean, CLEAN_CHECKS)
    if wrong:
        raise EvaluationError(f"{path}: malformed clean metrics ({wrong}): evaluate the run again")
    return clean


def _sweep_checks(levels: int) -> dict:
    """What a sweep result of ``levels`` levels holds (robustness_sweep), as _first_wrong's checks."""
    return {"level_list": lambda v: isinstance(v, str), "axis_levels": lambda v: _are_numbers(v, levels),
            # the first (noise-free) level is None for an SNR sweep (infinite SNR)
            "levels": lambda v: isinstance(v, list) and len(v) == levels and (v[0] is None or is_number(v[0]))
            and _are_numbers(v[1:], levels - 1),
            "accuracy": lambda v: _are_numbers(v, levels), "mean_f1": lambda v: _are_numbers(v, levels),
            "auc": is_number, "auc_f1": is_number, "n": lambda v: type(v) is int,
            "settings": lambda v: isinstance(v, dict) and all(type(v.get(k)) is int for k in SWEEP_SETTING_KEYS)}


def read_sweeps(path: Path) -> dict[str, dict]:
    """The sweep results of a robustness_<split>.json ({sweep: robustness_sweep result}), each
    checked to hold what the tables, the report and the masking check read."""
    sweeps = read_result(path, "sweeps")
    for name, result in sweeps.items():
        if not isinstance(result, dict):
            wrong = "not an object"
        elif not isinstance(result.get("levels"), list) or len(result["levels"]) < 2:
            wrong = f"'levels' is {result.get('levels')!r}"
        else:
            wrong = first_wrong(result, _sweep_checks(len(result["levels"])))
        if wrong:
            raise EvaluationError(f"{path}: malformed '{name}' results ({wrong}): evaluate the run again")
    return sweeps


def _level_labels(sweep: str, levels: list) -> list[str]:
    """Column names of a sweep table: "clean" for the first (noise-free) level, then the levels;
    SNR levels carry "dB" (their 0 dB is the loudest noise, not clean)."""
    unit = " dB" if sweep in SWEEPS and SWEEPS[sweep].snr_db else ""
    return ["clean", *(f"{level:g}{unit}" for level in levels[1:])]


def sweep_table(curves: dict[str, dict], sweep: str, metric: str) -> pd.DataFrame:
    """One sweep's table of ``metric`` (a key of SWEEP_METRICS) over {run: its sweeps, as
    read_sweeps reads them}: rows runs, columns clean, each level, then the AUC labelled with the
    level list it was computed over. Runs swept over different level lists are refused: their
    AUCs are not comparable."""
    results = {name: runs[sweep] for name, runs in curves.items() if sweep in runs}
    lists = {name: r["level_list"] for name, r in results.items()}
    if len(set(lists.values())) > 1:
        raise EvaluationError(f"compare: '{sweep}' was swept over different level lists ("
                              + ", ".join(f"{name}: {lists[name]}" for name in lists)
                              + "): their AUCs cannot share a column; evaluate them with the same --levels")
    auc_key, _ = SWEEP_METRICS[metric]
    rows = {name: {**dict(zip(_level_labels(sweep, r["levels"]), r[metric], strict=True)),
                   f"AUC ({r['level_list']} levels)": r[auc_key]} for name, r in results.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("run")


def run_names(run_dirs: list[str | Path]) -> list[str]:
    """How the tables and figures name the runs: their folders' names, or their paths when two
    folders share a name."""
    names = [Path(r).name for r in run_dirs]
    return names if len(set(names)) == len(names) else [str(r) for r in run_dirs]


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path, split: str = "test") -> dict[str, str]:
    """The paper's tables and figures for several evaluated runs, from their result files.

    Writes to out_dir: clean.md/.csv (per-class F1, mean F1, CPSC sub-scores, accuracy per
    run) and, for every sweep the runs share, <sweep>_accuracy and <sweep>_f1 .md/.csv (rows:
    runs; columns: clean, each level, AUC; ``sweep_table``) and .png (one curve per run);
    masking_check.md when a run has both the pgd_linf and the autoattack sweep
    (``masking_check``). What an earlier compare wrote there goes, the adversarial example
    (EXAMPLE_STEM .png and .json, evaluate.compare_with_example) included. Returns {table
    name: Markdown}.
    """

    names = run_names(run_dirs)
    clean_rows, curves = [], {}
    for name, run in zip(names, run_dirs):
        path = Path(run) / f"eval_{split}.json"
        clean = read_clean(path)
        clean_rows.append({"run": name, **{f"F1 {c}": f for c, f in zip(CLASSES, clean["f1"])},
                           **{k: clean[k] for k in ("mean_f1", "Faf", "Fblock", "Fpc", "Fst", "accuracy")},
                           "n": clean["n"]})
        robustness = Path(run) / f"robustness_{split}.json"
        if robustness.is_file():
            curves[name] = read_sweeps(robustness)
        else:
            curves[name] = {}
            print(f"note: {run} has no {robustness.name} (no robustness sweeps run): it is left out of "
                  "the robustness tables", file=sys.stderr)
    tables = {"clean": pd.DataFrame(clean_rows).set_index("run")}
    sweep_plots = {}
    for sweep in dict.fromkeys(s for run in curves.values() for s in run):
        for metric, short in (("accuracy", "accuracy"), ("mean_f1", "f1")):
            tables[f"{sweep}_{short}"] = sweep_table(curves, sweep, metric)
            sweep_plots[f"{sweep}_{short}"] = (sweep, metric)
    # The runs are accepted: the folder is made, and what an earlier compare wrote there goes, so
    # that no file stays that this one would not write.
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EvaluationError(f"--out {out_dir}: cannot create the output folder ({error.strerror})") from None
    earlier = [f"{sweep}_{short}.{ext}" for sweep in SWEEPS for short in ("accuracy", "f1")
               for ext in ("md", "csv", "png")]
    for name in ("clean.md", "clean.csv", "masking_check.md", f"{EXAMPLE_STEM}.png", f"{EXAMPLE_STEM}.json",
                 *earlier):
        (out_dir / name).unlink(missing_ok=True)
    markdown = {}
    for table_name, table in tables.items():
        write_text_atomic(out_dir / f"{table_name}.csv", table.to_csv(float_format="%.4f"))
        markdown[table_name] = to_markdown(table)
        write_text_atomic(out_dir / f"{table_name}.md", markdown[table_name] + "\n")
    for table_name, (sweep, metric) in sweep_plots.items():
        title = f"{sweep}, {split} split: {SWEEP_METRICS[metric][1]}"
        figures.sweep_curves_figure({name: {sweep: c[sweep]} for name, c in curves.items() if sweep in c},
                                    out_dir / f"{table_name}.png", title, metric)
    checks = {name: check for name, results in curves.items() if (check := masking_check(results))}
    if checks:
        markdown["masking_check"] = masking_check_markdown(checks)
        write_text_atomic(out_dir / "masking_check.md", markdown["masking_check"] + "\n")
    return markdown


# --- certificates (certify.py) -----------------------------------------------------------

def certificate_path(run_dir: str | Path, sigma: float) -> Path:
    """The JSON of a run's certification at ``sigma`` (certify.py writes its .csv and .png beside it)."""
    return Path(run_dir) / f"certify_{sigma:g}.json"


def _is_record(row) -> bool:
    return isinstance(row, dict) and is_number(row.get("radius")) and isinstance(row.get("correct"), bool)


CERTIFICATE_CHECKS = {
    "settings": lambda v: isinstance(v, dict) and all(is_number(v.get(k)) for k in ("sigma", "n0", "n", "alpha",
                                                                                      "max_records")),
    "n": lambda v: type(v) is int, "abstained": lambda v: type(v) is int, "seconds": is_number,
    "certified_accuracy": lambda v: isinstance(v, dict) and isinstance(v.get("radii"), list)
    and _are_numbers(v["radii"], len(v["radii"])) and _are_numbers(v.get("accuracy"), len(v["radii"])),
    "records": lambda v: isinstance(v, list) and all(map(_is_record, v)),
}


def read_certificate(path: Path) -> dict:
    """A certify_<sigma>.json, checked to hold what the report and reproduce read of it."""
    content = read_json(path) if Path(path).is_file() else None
    if not isinstance(content, dict):
        raise EvaluationError(f"{path}: missing or not a JSON object: certify the run again")
    wrong = first_wrong(content, CERTIFICATE_CHECKS)
    if wrong:
        raise EvaluationError(f"{path}: malformed certification ({wrong if len(wrong) < 200 else wrong[:200] + '...'}"
                              "): certify the run again")
    return content
