"""``neusub experiment GRID.toml --out DIR``: a resumable grid of training runs and its tables.

GRID.toml::

    [base]                    # settings shared by every run (any ``neusub train`` field)
    model = "resnet18"
    dataset = "fashion-mnist"
    epochs = 3

    [[grid]]                  # the runs are the product of the axes; several [[grid]] are joined
    recipe = ["conv2", "dbb"]
    setting = [{connectivity = "block"}, {connectivity = "ns", stochastic = 1.0}]
    seed = [0, 1, 2]

    [[exclude]]               # runs matching every key here are left out
    recipe = "plain"
    connectivity = "ns"

An axis is a list of values of one field, or a list of tables that set several fields
together. Each run lives in ``DIR/runs/<name>``; a run with ``result.json`` is done and
skipped, one with a checkpoint is resumed. ``DIR/results.csv`` has one row per run,
``DIR/tables.md`` the mean ± std over seeds: rows are the settings other than
connectivity / stochastic / guided / neural drop, columns those (as the paper's Tables 2–5).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from .analyze import run_label
from .checkpoint import atomic_save_json, atomic_write
from .config import FIELDS, TrainConfig, build_config, config_dict, load_toml
from .data import DATASETS
from .errors import CLIError

# Fields that make the columns of the tables (how layers are connected); the rest make rows.
COLUMN_FIELDS = ("connectivity", "stochastic", "neural_drop", "guided")
RUN_FIELDS = FIELDS - {"out", "resume"}
METRICS = {
    "val_acc_deployed": "deployed network",
    "val_acc_training": "training structure",
}


def _check_keys(values: dict, where: str) -> None:
    unknown = sorted(set(values) - RUN_FIELDS)
    if unknown:
        raise CLIError(f"{where}: unknown settings {unknown}; valid: {', '.join(sorted(RUN_FIELDS))}")


def expand_grid(spec: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """``([(run name, settings)], axis fields)`` of a parsed GRID.toml, in grid order, no duplicates."""
    base = spec.get("base", {})
    _check_keys(base, "[base]")
    grids = spec.get("grid")
    if isinstance(grids, dict):
        grids = [grids]
    if not grids:
        raise CLIError("the grid file has no [grid] (or [[grid]]) table of axes")
    excludes = spec.get("exclude", [])
    extra = sorted(set(spec) - {"base", "grid", "exclude"})
    if extra:
        raise CLIError(f"the grid file has unknown tables {extra}; use [base], [[grid]] and [[exclude]]")
    runs: dict[str, dict[str, Any]] = {}
    axis_fields: dict[str, None] = {}
    for index, grid in enumerate(grids):
        axes = []
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise CLIError(f"[[grid]] #{index + 1}: axis {key!r} must be a non-empty list")
            options = [v if isinstance(v, dict) else {key: v} for v in values]
            for option in options:
                _check_keys(option, f"[[grid]] #{index + 1} axis {key!r}")
                axis_fields.update(dict.fromkeys(option))
            axes.append(options)
        for combination in itertools.product(*axes):
            own: dict[str, Any] = {}
            for option in combination:
                own.update(option)
            if any(all(own.get(k, base.get(k)) == v for k, v in ex.items()) for ex in excludes):
                continue
            name = "_".join(f"{k}={v}" for k, v in own.items()).replace("/", "-").replace(" ", "")
            runs.setdefault(name, {**base, **own})
    return list(runs.items()), list(axis_fields)


def _settings_key(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k in RUN_FIELDS}


def _prepare(run_dir: Path, cfg: dict[str, Any]) -> str:
    """``done`` / ``resume`` / ``new`` for a run folder; refuses one made with other settings."""
    result = run_dir / "result.json"
    saved = run_dir / "config.json"
    if saved.exists():
        old = _settings_key(json.loads(saved.read_text()))
        new = _settings_key(cfg)
        changed = {k: (old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)}
        if changed:
            raise CLIError(
                f"run {run_dir} was made with other settings ({changed}: saved, now); "
                "use another --out, or remove that run folder to redo it"
            )
    if result.exists():
        return "done"
    if (run_dir / "last.pt").exists():
        return "resume"
    if run_dir.exists():  # started but stopped before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    return "new"


def run_one(name: str, settings: dict[str, Any], run_dir: str, threads: int) -> dict:
    """Train (or resume) one run, evaluate its deployed network, write ``result.json``."""
    from ..analysis import accuracy
    from .analyze import val_batches
    from .commands import cmd_train, load_run_model

    torch.set_num_threads(threads)
    path = Path(run_dir)
    state = _prepare(path, settings)
    if state == "done":
        return json.loads((path / "result.json").read_text())
    start = time.perf_counter()
    flags = {**settings, "out": str(path), "resume": state == "resume"}
    record = cmd_train({k: v for k, v in flags.items() if k in FIELDS}, None, progress=False)
    # The last epoch's record (a resumed run that had finished training returns none itself).
    lines = (path / "metrics.jsonl").read_text().splitlines()
    last = [r for r in map(json.loads, filter(None, lines)) if "epoch" in r][-1]
    plain, cfg, _, _ = load_run_model(str(path / "deployed.pt"))
    batches = val_batches(cfg, cfg.val_samples)
    result = {
        "name": name,
        **config_dict(cfg),
        "label": run_label(cfg),
        "val_acc_training": last["val_acc"],
        "val_acc_deployed": accuracy(plain, batches),
        "val_samples": sum(len(y) for _, y in batches),
        "train_acc": last["train_acc"],
        "equivalence_error": record["equivalence_error"],
        "train_seconds": round(time.perf_counter() - start, 1),
        "resumed": state == "resume",
    }
    atomic_save_json(result, path / "result.json")
    return result


# ---------------------------------------------------------------------- tables


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.2f} (n=1)"
    return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _row_fields(results: list[dict], axes: list[str]) -> list[str]:
    return [
        k for k in axes if k not in COLUMN_FIELDS and k != "seed" and len({str(r[k]) for r in results}) > 1
    ]


def tables(results: list[dict], axes: list[str]) -> str:
    """Markdown: per metric, mean ± std over seeds (rows: other settings; columns: connectivity)."""
    row_fields = _row_fields(results, axes) or ["recipe"]
    setting = lambda r: r["label"].split(" ", 1)[1] if " " in r["label"] else r["label"]  # noqa: E731
    row_key = lambda r: " ".join(str(r[k]) for k in row_fields)  # noqa: E731
    rows = list(dict.fromkeys(row_key(r) for r in results))
    columns = list(dict.fromkeys(setting(r) for r in results))
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        cells.setdefault((row_key(r), setting(r)), []).append(r)
    seeds = sorted({r["seed"] for r in results})
    out = [
        f"Mean ± standard deviation over seeds {seeds} (accuracy, %); n = runs per cell when it differs.",
        "",
    ]
    for metric, title in METRICS.items():
        out += [
            f"### Validation accuracy: {title}",
            "",
            "| " + " | ".join(row_fields) + " | " + " | ".join(columns) + " |",
            "|---" * len(row_fields) + "|--:" * len(columns) + "|",
        ]
        for row in rows:
            values = [_mean_std([c[metric] for c in cells.get((row, col), [])]) for col in columns]
            out.append("| " + row.replace(" ", " | ") + " | " + " | ".join(values) + " |")
        out.append("")
    base = columns[0]
    if len(columns) > 1:
        out += [
            f"### Deployed accuracy minus `{base}` (points; mean ± std of differences paired by seed)",
            "",
            "| " + " | ".join(row_fields) + " | " + " | ".join(columns[1:]) + " |",
            "|---" * len(row_fields) + "|--:" * (len(columns) - 1) + "|",
        ]
        for row in rows:
            ref = {c["seed"]: c["val_acc_deployed"] for c in cells.get((row, base), [])}
            values = []
            for col in columns[1:]:
                diffs = [
                    c["val_acc_deployed"] - ref[c["seed"]]
                    for c in cells.get((row, col), [])
                    if c["seed"] in ref
                ]
                values.append(_mean_std(diffs).replace(" (n=1)", "") if diffs else "—")
            out.append("| " + row.replace(" ", " | ") + " | " + " | ".join(values) + " |")
        out.append("")
    return "\n".join(out)


def write_csv(results: list[dict], path: Path) -> None:
    keys = ["name", "label", "val_acc_deployed", "val_acc_training", "train_acc", "equivalence_error",
            "train_seconds", "seed", "recipe", "connectivity", "stochastic", "guided", "model", "width_mult",
            "epochs", "train_samples", "val_samples"]  # fmt: skip
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode()))


# ---------------------------------------------------------------------- command


def _check_names(cfg: TrainConfig) -> None:
    """Model, recipe, connectivity, activation and dataset names, without building anything."""
    from ..models import LayerFactory, list_models

    if cfg.model not in list_models():
        raise CLIError(f"unknown model {cfg.model!r}; choose one of {', '.join(list_models())}")
    if cfg.dataset not in DATASETS:
        raise CLIError(f"unknown dataset {cfg.dataset!r}; choose one of {', '.join(DATASETS)}")
    try:
        LayerFactory(cfg.recipe or "nsnet", cfg.connectivity, cfg.stochastic, cfg.neural_drop, cfg.act)
    except ValueError as err:
        raise CLIError(str(err)) from None


def cmd_experiment(grid_file: str, out: str, jobs: int = 1, progress: bool = True) -> dict:
    file = Path(grid_file)
    if not file.is_file():
        raise CLIError(f"grid file {grid_file} does not exist")
    spec = load_toml(file)
    runs, axes = expand_grid(spec)
    for _, settings in runs:  # every run's settings must be valid before anything starts
        _check_names(build_config(settings.get("preset"), settings, {}))
    if jobs < 1:
        raise CLIError(f"--jobs={jobs} is out of range; use an integer >= 1")
    out_dir = Path(out)
    (out_dir / "runs").mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    results: list[dict] = []
    start = time.perf_counter()

    def report(result: dict, done: int) -> None:
        results.append(result)
        if progress:
            elapsed = time.perf_counter() - start
            accuracy = 100 * result["val_acc_deployed"]
            print(
                f"[{done}/{len(runs)}] {result['name']}: deployed {accuracy:.2f}% "
                f"({result['train_seconds']:.0f} s; {elapsed / 60:.1f} min so far)",
                flush=True,
            )

    tasks = [(name, settings, str(out_dir / "runs" / name), threads) for name, settings in runs]
    if jobs == 1:
        for i, task in enumerate(tasks):
            report(run_one(*task), i + 1)
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, *task) for task in tasks]
            for i, future in enumerate(futures):
                report(future.result(), i + 1)
    write_csv(results, out_dir / "results.csv")
    text = f"# Experiment `{file.name}`\n\n{len(results)} runs.\n\n" + tables(results, axes)
    atomic_write(out_dir / "tables.md", lambda handle: handle.write(text.encode()))
    return {
        "runs": len(results),
        "tables": str(out_dir / "tables.md"),
        "csv": str(out_dir / "results.csv"),
        "minutes": round((time.perf_counter() - start) / 60, 1),
    }


__all__ = ["cmd_experiment", "expand_grid", "tables"]
