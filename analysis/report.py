"""What reproduce.py writes about a chain besides the runs: each stage's times (timings.json,
kept across invocations), the reproduction report (report.md) and the coefficient study's
report (selection.md). The runs' results are read through analysis/compare.py; the numbers are theirs.
"""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

from analysis import compare, figures, selection
from analysis.metrics import certified_curve
from config import PRESETS, SWEEPS, TRAIN_DEFAULTS, Preset, preset_settings
from databases.cpsc2018 import CLASSES
from plumbing.safe_writes import read_json, write_json, write_text_atomic

CHANCE_NOTE_ACCURACY = 1.5 / len(CLASSES)  # the report flags runs whose clean accuracy is no better than this


# --- stage timings ---------------------------------------------------------------------

# What Timings reads of an earlier invocation's stage: {key: test of its value}.
STAGE_CHECKS = {"stage": lambda v: isinstance(v, str), "status": lambda v: isinstance(v, str),
                "seconds": compare.is_number, "cpu_seconds": compare.is_number,
                "earlier": lambda v: v is None or not _stage_problem(v)}


def _stage_problem(entry) -> str | None:
    """What is wrong with a stage entry of timings.json (Timings.record writes them); None: nothing."""
    return compare.first_wrong(entry, STAGE_CHECKS) if isinstance(entry, dict) else f"{entry!r} is not an object"


def _timings_problem(timings) -> str | None:
    """What is wrong with the content of a timings.json; None: nothing."""
    if not isinstance(timings, dict) or not isinstance(timings.get("stages"), list):
        return "not a JSON object with a list of 'stages'"
    return next((f"stage {i + 1}: {wrong}" for i, entry in enumerate(timings["stages"])
                 if (wrong := _stage_problem(entry))), None)


class Timings:
    """Per-stage wall and CPU times, kept in <result dir>/timings.json across invocations:
    a stage skipped now keeps the times of the invocation that ran it. A timings.json that this
    class would not have written is set aside (a note says so) and written anew."""

    def __init__(self, path: Path, preset: str, dry_run: bool):
        self.path, self.dry_run = path, dry_run
        previous = read_json(path) if path.is_file() else None
        if path.is_file() and (wrong := _timings_problem(previous)):
            print(f"note: {path}: {wrong}: the earlier invocations' stage times are dropped", flush=True)
            previous = None
        self.previous = {s["stage"]: s for s in (previous or {}).get("stages", [])} \
            if (previous or {}).get("preset") == preset else {}
        self.preset = preset
        self.stages: list[dict] = []
        self.started = time.time()

    def record(self, stage: str, status: str, seconds: float = 0.0, cpu_seconds: float = 0.0,
               command: list[str] | None = None) -> None:
        entry = {"stage": stage, "status": status, "seconds": round(seconds, 2),
                 "cpu_seconds": round(cpu_seconds, 2), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        if command:
            entry["command"] = shlex.join(command)
        if status == "skipped" and self._last_run(stage):
            entry["earlier"] = self._last_run(stage)
        self.stages.append(entry)
        self.save()

    def _last_run(self, stage: str) -> dict | None:
        """The entry of the last invocation that ran ``stage`` (not just skipped it)."""
        earlier = self.previous.get(stage)
        return earlier.get("earlier") if earlier and earlier["status"] == "skipped" else earlier

    def all_stages(self) -> list[dict]:
        """This invocation's stages, plus (as skipped) those that only an earlier invocation ran
        (with --skip_train or --methods), in the order they ran."""
        current = {entry["stage"]: entry for entry in self.stages}
        carried = {name: {"stage": name, "status": "skipped", "seconds": 0.0, "cpu_seconds": 0.0,
                          "finished": None, "earlier": self._last_run(name)}
                   for name in self.previous if name not in current and self._last_run(name)}
        by_name = {**carried, **current}
        order = list(self.previous) + [name for name in current if name not in self.previous]
        return [by_name[name] for name in order if name in by_name]

    def save(self) -> None:
        if self.dry_run:
            return
        data = {"preset": self.preset, "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)),
                "total_seconds": round(time.time() - self.started, 2),
                "total_cpu_seconds": round(sum(s["cpu_seconds"] for s in self.stages), 2),
                "stages": self.all_stages()}
        write_json(data, self.path)


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes \
        else f"{seconds} s"


# --- the report ----------------------------------------------------------------------------

def _format_seconds(seconds) -> str:
    return "n/a" if seconds is None else duration(seconds)


def _run_settings(job) -> str:
    """The run's own hyperparameters (method-specific) and its training noise, as key=value."""
    keys = [*job.hyperparameters, *(["noise_sd"] if getattr(job.cfg, "noise_sd", 0) else [])]
    return ", ".join(f"{k}={getattr(job.cfg, k):g}" if isinstance(getattr(job.cfg, k), float)
                     else f"{k}={getattr(job.cfg, k)}" for k in keys) or "none"


def _epochs_done(job, history: list[dict]) -> str:
    """The epochs trained, and the epoch model.pt holds when the run's guard stopped it early
    (harness.stop_collapsed records that in the evaluation's settings)."""
    stopped = read_json(job.run_dir / "eval_test.json").get("settings", {}).get("stopped_early")
    if not stopped:
        return str(len(history))
    return (f"{len(history)}, stopped by its guard: `model.pt` is epoch {stopped['best_epoch']}'s "
            f"(guard accuracy {stopped['best_guard_accuracy']:.3f}, then {stopped['guard_accuracy']:.3f})")


def _preset_changes(preset: str, job) -> str:
    """What ``preset`` changes for this run against the paper's settings (config.PRESETS):
    its method settings and its own section, each with the paper's value."""
    paper = {**TRAIN_DEFAULTS, **job.training, **job.hyperparameters}
    changed = {k: v for k, v in preset_settings(preset, job.method).items()
               if k in job.hyperparameters or k in PRESETS[preset].settings.get(job.method, {})}
    return ", ".join(f"{k}={v:g} (paper {paper[k]:g})" for k, v in changed.items()) or "none"


def _sweep_settings_line(sweep: str, results: dict[str, dict], split: str = "test") -> str:
    """One line stating the attack/noise settings (they are shared when the runs agree)."""
    def describe(settings: dict) -> str:
        records = f"all {split} batches" if not settings["max_batches"] else \
            f"the first {settings['max_batches']} {split} batch(es)"
        if settings.get("max_records"):
            records = f"a fixed class-balanced subset of {settings['max_records']} {split} records"
        return f"{SWEEPS[sweep].describe(settings)}, {records}, seed {settings['seed']}"

    described = {run: describe(r["settings"]) for run, r in results.items()}
    if len(set(described.values())) == 1:
        return next(iter(described.values()))
    return "; ".join(f"{run}: {text}" for run, text in described.items())


def _sweep_notes(sweep: str, results: dict[str, dict]) -> list[str]:
    """What a sweep's numbers are (an attack's envelope or each level's own), and for an ensemble
    which version ran, which attack broke how many records and AutoAttack's warnings; then the
    paper's per-level numbers beside the envelope where the sweep kept them (fidelity)."""
    if not SWEEPS[sweep].attacks_model:
        return ["Numbers per level: a noise draw is no attack, so a record's outcome at one level bounds "
                "nothing at another.", ""]
    if not all(r.get("envelope") for r in results.values()):
        return ["Numbers per level (each eps attacked every record on its own; results written before this "
                "project reported the envelope).", ""]
    lines = ["Robust accuracy is the envelope: a record broken at an eps counts as broken at every larger "
             "eps (its adversarial input lies inside every larger ball), so it never rises with the budget; "
             "each eps attacked only the records unbroken below it" +
             (", except where the per-level table below says otherwise." if any("per_level" in r for r in
                                                                                 results.values()) else ".")]
    for run, result in results.items():
        if "broken_by" in result:
            counts = ", ".join(f"{name} {sum(n)}" for name, n in result["broken_by"].items())
            lines.append(f"- **{run}**: AutoAttack {result['ensemble_version']} ran; records broken first by "
                         f"each attack (all eps): {counts}.")
            lines += [f"  - Warning: {warning}" for warning in result.get("warnings", [])]
    per_level = {run: r["per_level"] for run, r in results.items() if "per_level" in r}
    if per_level:
        levels = next(iter(results.values()))["levels"][1:]
        lines += ["", "The paper's numbers, each eps attacking every record on its own (`--sweep_per_level`; "
                  "class-balanced accuracy):", "",
                  "| run | clean | " + " | ".join(f"{level:g}" for level in levels) + " |",
                  "|---|---|" + "---|" * len(levels)]
        lines += [f"| {run} | " + " | ".join(f"{a:.3f}" for a in own["accuracy"]) + " |"
                  for run, own in per_level.items()]
    return lines + [""]


def build_report(plan_name: str, plan: Preset, raw_dir: Path, data_dir: Path, result_dir: Path, jobs: list,
                 ready: list, tables: dict[str, str], timings: Timings, *, meta: dict | None,
                 histories: dict, configs: dict) -> str:
    """report.md of the runs ``jobs`` (reproduce.Job) of a preset, ``ready`` those evaluated: ``tables``
    from analysis.compare.compare_runs, ``meta`` the cache's meta.json (None: unreadable), ``histories`` and
    ``configs`` each ready run's history.json and config.json."""
    def rel(path: Path) -> str:
        return Path(path).relative_to(result_dir).as_posix() if Path(path).is_relative_to(result_dir) \
            else Path(path).as_posix()

    lines = [f"# Reproduction report: `{plan_name}` preset", "", plan.data_note, "",
             f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
             f"`python {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`.",
             ""]
    lines += ["## Data", "", f"- records: `{raw_dir}` ({meta['source_format'] if meta else '?'} form, "
              f"{meta['n_records'] if meta else '?'} usable records)",
              f"- cache: `{data_dir}`; split: {plan.val_per_class} validation and {plan.test_per_class} test "
              "records per class (PROTOCOL section 2's seeded procedure), multi-label records in no split"]
    if meta:
        counts = meta["class_counts"]
        classes = list(counts["train"])
        lines += ["", "| split | " + " | ".join(classes) + " | total |", "|---|" + "---|" * (len(classes) + 1)]
        for split in ("train", "val", "test"):
            lines.append(f"| {split} | " + " | ".join(str(counts[split][c]) for c in classes)
                         + f" | {sum(counts[split].values())} |")
    lines += [""]

    lines += ["## Runs", "",
              f"Preset `{plan_name}` for every run: " +
              ", ".join(f"{k}={getattr(jobs[0].cfg, k)}" for k in
                        ("epochs", "batch_size", "lr", "max_length", "random_pad", "max_batches", "model")) +
              " (a run's own changes are in its row). Checkpoint evaluated: each run's final `model.pt` "
              "(the last epoch, except where its row says the run's guard stopped it and kept an earlier one).",
              "",
              "| run | method | method settings | preset's changes to the paper's settings | epochs done | "
              "checkpoint | device | training time | final val accuracy | figures |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for job in ready:
        history = histories[job]
        train_seconds = sum(h.get("seconds", 0) for h in history) if history else None
        val = f"{history[-1]['val_accuracy']:.3f}" if history else "n/a"
        lines.append(f"| {job.run_dir.name} | {job.method} | {_run_settings(job)} | "
                     f"{_preset_changes(plan_name, job)} | {_epochs_done(job, history)} | "
                     f"`{rel(job.run_dir / 'model.pt')}` | {configs[job].get('device_used', '?')} | "
                     f"{_format_seconds(train_seconds)} | {val} | [training curves]({rel(job.run_dir / 'curves.png')}), "
                     f"[test confusion matrix]({rel(job.run_dir / 'confusion_test.png')}) |")
    missing = [job for job in jobs if job not in ready]
    if missing:
        lines += ["", "Not in the tables (not trained or not evaluated yet): "
                  + ", ".join(f"`{job.run_dir.name}`" for job in missing) + "."]

    evals = {job: compare.read_clean(job.run_dir / "eval_test.json") for job in ready}
    n_test = {evals[job]["n"] for job in ready}
    lines += ["", "## Clean metrics", "",
              f"Split: test ({', '.join(map(str, sorted(n for n in n_test if n)))} records), clean inputs, model in "
              "eval mode, signals right-aligned. Checkpoint of each row: that run's `model.pt` (see Runs). "
              "Columns: per-class F1, mean F1 over the 9 classes, the CPSC2018 sub-scores Faf, Fblock, Fpc, "
              "Fst, class-balanced accuracy (mean per-class recall), number of records. Time: part of each "
              "run's training stage (see Stage timings).", "", tables["clean"], ""]
    near_chance = [job.run_dir.name for job in ready if evals[job]["accuracy"] <= CHANCE_NOTE_ACCURACY]
    if near_chance:
        lines += [f"Note: near chance (class-balanced accuracy of guessing: 1/{len(CLASSES)} = "
                  f"{1 / len(CLASSES):.3f}): "
                  f"{', '.join(f'`{name}`' for name in near_chance)}. Within this preset's training budget "
                  "such a run learned (almost) nothing, so its robustness rows below are no evidence of "
                  "robustness (a constant prediction does not change under any noise).", ""]

    robustness = {job: compare.read_sweeps(job.run_dir / "robustness_test.json")
                  if (job.run_dir / "robustness_test.json").is_file() else {} for job in ready}
    sweep_names = [s for s in SWEEPS if f"{s}_accuracy" in tables]
    if sweep_names:
        lines += ["## Robustness", "",
                  "Per noise type two tables, class-balanced accuracy and mean F1 over the 9 classes (the "
                  "paper's two measures). Rows: runs; columns: clean, then each noise level, then the "
                  "robustness AUC (trapezoid area under the measure over the level, from 0 to the largest "
                  "level, divided by it), labelled with the level list it was computed over (`--levels`; "
                  "PROTOCOL section 6). A record misclassified on the clean input counts as wrong at every "
                  "level. Split: test. Checkpoint of each row: that run's `model.pt`. Sweep times are per "
                  "run, measured inside its training stage.", ""]
    for sweep in sweep_names:
        results = {job.run_dir.name: robustness[job][sweep] for job in ready if sweep in robustness[job]}
        n_used = sorted({r["n"] for r in results.values()})
        level_note = ("columns: signal-to-noise ratio in dB (noise only on the signal, scaled per record and "
                      "lead; 0 dB is the loudest); AUC over the noise/signal amplitude ratio 10^(-SNR/20), 0 to 1"
                      if SWEEPS[sweep].snr_db else f"columns: {SWEEPS[sweep].axis}")
        times = ", ".join(f"{run} {_format_seconds(r.get('seconds'))}" for run, r in results.items())
        lines += [f"### {SWEEPS[sweep].title} (`{sweep}`)", "",
                  f"Split: test, {', '.join(map(str, n_used))} records used; {level_note}. "
                  f"Settings: {_sweep_settings_line(sweep, results)}. Time: {times}.", "",
                  *_sweep_notes(sweep, results),
                  "Class-balanced accuracy:", "", tables[f"{sweep}_accuracy"], "",
                  f"![{sweep}, accuracy]({rel(result_dir / 'compare' / f'{sweep}_accuracy.png')})", "",
                  "Mean F1:", "", tables[f"{sweep}_f1"], "",
                  f"![{sweep}, mean F1]({rel(result_dir / 'compare' / f'{sweep}_f1.png')})", ""]

    lines += certified_section(plan, ready, result_dir, rel)

    example = result_dir / "compare" / "adversarial_example.png"
    if example.is_file():
        plotted = read_json(example.with_suffix(".json"))
        eps = plotted.get("eps", "?") if isinstance(plotted, dict) else "?"
        lines += ["## Adversarial example", "",
                  f"One test record under L-inf PGD at eps {eps} (each run's pgd_linf settings), every run side by "
                  "side: two leads clean and attacked, the perturbation, the predictions before and after; the "
                  f"title says how the record was chosen. The plotted numbers: `{rel(example.with_suffix('.json'))}`.",
                  "", f"![adversarial example]({rel(example)})", ""]

    checks = {job.run_dir.name: check for job in ready if (check := compare.masking_check(robustness[job]))}
    if checks:
        lines += ["## Gradient-masking check", "",
                  "For each run with both a PGD (`pgd_linf`) and an ensemble (`autoattack`) sweep: "
                  "class-balanced accuracy under each at every shared eps, the gap in points (PGD minus "
                  "ensemble) and, when the run has a `square` sweep, Square's accuracy next to the strongest "
                  f"gradient attack's. A run is flagged when the ensemble is more than {100 * compare.MASKING_GAP:g} "
                  "points below PGD at some eps, or when Square, which uses no gradients, does better than "
                  "the gradient attacks: then PGD's numbers overstate the model's robustness.", "",
                  compare.masking_check_markdown(checks), ""]

    lines += ["## Stage timings", "",
              f"Wall time and CPU time (user + system of the stage's processes) of this invocation; a skipped "
              f"stage shows the invocation that ran it. Also in `{rel(timings.path)}`.", "",
              "| stage | status | wall time | CPU time | finished |", "|---|---|---|---|---|"]
    for entry in (e for e in timings.all_stages() if e["stage"] != "report"):  # this one is being written
        shown = entry.get("earlier") if entry["status"] == "skipped" and entry.get("earlier") else entry
        status = entry["status"] + (" (ran earlier)" if shown is not entry else "")
        lines.append(f"| {entry['stage']} | {status} | {_format_seconds(shown['seconds'])} | "
                     f"{_format_seconds(shown['cpu_seconds'])} | {shown['finished']} |")
    lines += ["", f"Total wall time of this invocation: {duration(time.time() - timings.started)}.", ""]
    return "\n".join(lines)


# --- certified robustness (certify.py's results) ----------------------------------------------

CERTIFIED_FIGURE = "certified_accuracy.png"  # in the compare folder


def certified_section(plan: Preset, ready: list, result_dir: Path, rel) -> list[str]:
    """The report's section on certified robustness: for each run of ``ready`` that has a
    certification at a sigma of ``plan.certify`` (compare.certificate_path), its certified
    accuracy at each radius, and compare/CERTIFIED_FIGURE (one panel per sigma, one curve per run),
    drawn here; ``rel`` writes a path as the report links it. A certificate of another split or
    older than the run's model.pt is left out and named. No figure (an earlier one is removed)
    when no current certificate is found, and no lines when none is left out either."""
    figure = result_dir / "compare" / CERTIFIED_FIGURE
    sigmas = plan.certify.sigmas if plan.certify else ()
    found, left_out = {}, []
    for job in ready:
        for sigma in sigmas:
            path = compare.certificate_path(job.run_dir, sigma)
            if not path.is_file():
                continue
            certificate = compare.read_certificate(path)
            problem = compare.certificate_problem(path, certificate, job.run_dir, "test")
            if problem:
                left_out.append(f"`{rel(path)}` ({problem})")
            else:
                found[job.run_dir.name, sigma] = certificate
    if not found:
        figure.unlink(missing_ok=True)
    if left_out:
        left_out = [f"Left out: {', '.join(left_out)}; `reproduce.py` certifies these runs again on the test "
                    "split.", ""]
    if not found:
        return ["## Certified robustness (randomized smoothing)", "", *left_out] if left_out else []
    lines = ["## Certified robustness (randomized smoothing)", "",
             "The attacks above measure empirical robustness, an upper bound on the model's robustness: a "
             "stronger attack can only lower it. Certified accuracy is a guarantee, but for the smoothed model "
             "(the class the run's model predicts most often under Gaussian noise of standard deviation sigma "
             "on the signal), not for the run's model itself: a record counts at radius r when the smoothed "
             "model classifies it correctly and, with probability at least 1 - alpha, no perturbation of its "
             "signal of L2 norm below r changes that (Cohen, Rosenfeld and Kolter 2019; `certify.py`, PROTOCOL "
             "section 10). The radius is in the units of the `pgd_l2` sweep (the model input). Abstentions count "
             "as wrong. Split: test.", "", *left_out]
    radii = next(iter(found.values()))["certified_accuracy"]["radii"]
    lines += ["| run | sigma | " + " | ".join(f"r = {r:g}" for r in radii) + " | abstained | records | n0 | n | "
              "alpha | time |", "|---|" + "---|" * (len(radii) + 7)]
    for (run, sigma), certificate in found.items():
        settings, table = certificate["settings"], certificate["certified_accuracy"]
        accuracy = dict(zip(table["radii"], table["accuracy"]))
        lines.append(f"| {run} | {sigma:g} | " + " | ".join(f"{accuracy[r]:.3f}" if r in accuracy else "n/a"
                                                          for r in radii)
                     + f" | {certificate['abstained']} | {certificate['n']} | {settings['n0']} | {settings['n']} | "
                     f"{settings['alpha']:g} | {_format_seconds(certificate['seconds'])} |")
    panels: dict[str, dict] = {}
    for (run, sigma), certificate in found.items():
        records = certificate["records"]
        panels.setdefault(f"sigma {sigma:g}", {})[run] = certified_curve([r["radius"] for r in records],
                                                                         [r["correct"] for r in records])
    figures.certified_accuracy_figure(panels, figure, "Certified accuracy (randomized smoothing), test split")
    lines += ["", f"![certified accuracy]({rel(figure)})", ""]
    return lines


def write_selection_report(preset: str, plan: Preset, jobs: list, result_dir: Path, timings: Timings,
                           sweep: str) -> Path:
    """selection.md: per method of the grid, the validation tables and each criterion's pick."""
    started = time.perf_counter()
    studies = {method: (setting, {getattr(job.cfg, setting): job.run_dir for job in jobs if job.method == method})
               for method, setting, _ in plan.grid}
    body = selection.selection_report({m: study for m, study in studies.items() if study[1]}, sweep,
                                      result_dir / "selection")
    path = result_dir / "selection.md"
    write_text_atomic(path, "\n".join([
        "# Coefficient selection", "", plan.data_note, "",
        f"Written {time.strftime('%Y-%m-%d %H:%M:%S')} by "
        f"`python {shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`.",
        "", f"Each run: the paper's settings (preset `{preset}`) but for the coefficient in "
        f"its row; its final `model.pt` evaluated on the validation split under `{sweep}` "
        f"({_sweep_settings_line(sweep, _validation_sweeps(jobs, sweep), 'val')}). Rows: the coefficient; columns: "
        "clean, each level, the robustness AUC over the level list named in its header. Each criterion picks "
        "the value with the highest score (a tie: the first value of the grid).", "", body]))
    timings.record("selection report", "ran", time.perf_counter() - started)
    return path


def _validation_sweeps(jobs: list, sweep: str) -> dict[str, dict]:
    return {job.run_dir.name: compare.read_sweeps(job.run_dir / "robustness_val.json")[sweep]
            for job in jobs}
