"""The coefficient-selection study of ``reproduce.py --preset paper-selection``: which NSR beta2
and which Jacobian beta each criterion picks on the validation split, and what the study costs.

The paper chose its coefficients by training each value of a grid and judging the models on
the validation split under PGD L-inf at the paper's levels. Each criterion below picks the
value with the highest score; a tie goes to the first value in the grid's order.
"""
from __future__ import annotations

import math
from pathlib import Path

from analysis import compare, figures
from analysis.metrics import SWEEP_METRICS, to_markdown
from config import noise_levels
from databases.cpsc2018 import CLASSES
from plumbing.safe_writes import read_json, write_json, write_text_atomic

# criterion: its score in one PGD sweep result (robustness_sweep) on the validation split
CRITERIA = {
    "clean accuracy": lambda r: r["accuracy"][0],
    "clean mean F1": lambda r: r["mean_f1"][0],
    "AUC of accuracy": lambda r: r["auc"],
    "AUC of mean F1": lambda r: r["auc_f1"],
}

# Cost estimates: the CPU figures of benchmarks/bench_methods.py (seconds per sample at the
# paper's input length, 1 thread) at the paper's data size (PROTOCOL sections 2-3).
BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "methods_cpu.json"
PAPER_EPOCH_SAMPLES = len(CLASSES) * 1478  # the class-balanced sampler: 9 x the largest class (RBBB)
PAPER_VAL_RECORDS, PAPER_TEST_RECORDS = 45, 450
# The evaluation rows of methods_cpu.json (bench_methods.py names its rows with these and benchmark_row)
CLEAN_ROW, PGD_ROW = "eval: clean forward", "eval: PGD-100"


def picks(results: dict[float, dict]) -> dict[str, tuple[float, float]]:
    """{criterion: (the value it picks, its score)} over {value: sweep result}, values in grid order."""
    chosen = {}
    for criterion, score in CRITERIA.items():
        best = max(results, key=lambda value: (score(results[value]), -list(results).index(value)))
        chosen[criterion] = (best, score(results[best]))
    return chosen


def selection_report(studies: dict[str, tuple[str, dict[float, Path]]], sweep: str, out_dir: Path) -> str:
    """The selection report (Markdown) of {method: (setting, {value: run folder})}: per method the
    accuracy and mean-F1 tables of ``sweep`` on the validation split, their figures and each
    criterion's pick. Writes the tables (CSV, Markdown), figures (PNG) and picks.json to out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines, all_picks = [], {}
    for method, (setting, runs) in studies.items():
        results = {value: compare.read_sweeps(run / "robustness_val.json").get(sweep)
                   for value, run in runs.items()}
        missing = [str(runs[value]) for value, result in results.items() if result is None]
        if missing:
            raise compare.EvaluationError(f"{missing[0]}: no '{sweep}' sweep on the validation split "
                                           "(rerun reproduce.py without --skip_train)")
        curves = {f"{setting}={value:g}": {sweep: result} for value, result in results.items()}
        lines += [f"## {method}: {setting}", ""]
        for metric, name in (("accuracy", "accuracy"), ("mean_f1", "f1")):
            table = compare.sweep_table(curves, sweep, metric)
            stem = out_dir / f"{method}_{name}"
            write_text_atomic(stem.with_suffix(".csv"), table.to_csv(float_format="%.4f"))
            markdown = to_markdown(table)
            write_text_atomic(stem.with_suffix(".md"), markdown + "\n")
            label = SWEEP_METRICS[metric][1]
            figures.sweep_curves_figure(curves, stem.with_suffix(".png"), f"{method}, validation split: {label}",
                                        metric)
            lines += [f"{label.capitalize()}:", "", markdown, "",
                      f"![{method}, {label}]({out_dir.name}/{stem.name}.png)", ""]
        chosen = picks(results)
        all_picks[method] = {criterion: {setting: value, "score": score}
                             for criterion, (value, score) in chosen.items()}
        lines += [f"| criterion | {setting} | score |", "|---|---|---|"]
        lines += [f"| {criterion} | {value:g} | {score:.3f} |" for criterion, (value, score) in chosen.items()]
        lines.append("")
    write_json(all_picks, out_dir / "picks.json")
    return "\n".join(lines)


def benchmark_row(method: str, cfg) -> str:
    """The row of methods_cpu.json that times a training step of ``method`` with its settings."""
    if method == "jacob":
        return "jacob" if cfg.jacobian_projections == 0 else f"jacob ({cfg.jacobian_projections} projection)"
    if method == "fast_adv" and cfg.wong_loss:
        return "fast_adv (Wong's loss)"
    return method


def estimate_seconds(method: str, cfg, sweep: str, benchmark: Path = BENCHMARK) -> dict[str, float]:
    """Estimated seconds of one selection run at the paper's data size, by the figures of
    ``benchmark`` (bench_methods' format; single-thread CPU by default): training, the clean
    evaluation of the validation and test splits, and ``sweep`` on the validation split (an upper
    bound: every record attacked at every level with every start; early stop and records wrong
    on the clean input make it cheaper)."""
    rows = {row["row"]: row["seconds_per_sample"] for row in read_json(benchmark)["rows"]}
    row = benchmark_row(method, cfg)
    if row not in rows:
        raise KeyError(f"{benchmark.name} has no row '{row}'")
    batches = math.ceil(PAPER_EPOCH_SAMPLES / cfg.batch_size)
    batches = min(batches, cfg.max_batches) if cfg.max_batches else batches
    clean = rows[CLEAN_ROW]
    return {"train": cfg.epochs * batches * cfg.batch_size * rows[row],
            "clean evaluation": (PAPER_VAL_RECORDS + PAPER_TEST_RECORDS) * clean,
            f"{sweep} (validation)": PAPER_VAL_RECORDS * len(noise_levels(sweep, cfg.levels)) * cfg.sweep_restarts
            * cfg.sweep_steps / 100 * rows[PGD_ROW]}


def cost_source(method_rows: list[str], benchmark: Path = BENCHMARK) -> str:
    """Where the figures of ``benchmark`` come from, for the dry run's output."""
    figures_of = read_json(benchmark)
    timed = {row["row"] for row in figures_of["rows"]}
    settings = figures_of["settings"]
    return (f"figures: {benchmark.relative_to(benchmark.parents[2]).as_posix()} (`{figures_of['command']}`; "
            f"{settings['device']}, {settings['threads']} thread, input length "
            f"{settings['length']}), seconds_per_sample of the rows "
            + ", ".join(f"'{row}'" for row in dict.fromkeys(method_rows) if row in timed)
            + f", '{CLEAN_ROW}' and '{PGD_ROW}'; at the paper's size: "
            f"{PAPER_EPOCH_SAMPLES} training samples per epoch (PROTOCOL section 3), {PAPER_VAL_RECORDS} validation "
            f"and {PAPER_TEST_RECORDS} test records")
