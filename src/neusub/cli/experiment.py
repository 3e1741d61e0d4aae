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
import ctypes
import io
import itertools
import json
import os
import signal
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from .checkpoint import atomic_save_json, atomic_write
from .config import FIELDS, build_config, check_values, config_dict, load_toml
from .errors import CLIError, Stopped, describe_os_error, stop_code
from .plots import run_label
from .runfolder import CHECKPOINTED, FINISHED, STARTED, RunFolder, epoch_records

# Fields that make the columns of the tables (how layers are connected); the rest make rows.
COLUMN_FIELDS = ("connectivity", "stochastic", "neural_drop", "guided")
RUN_FIELDS = FIELDS - {"out", "resume"}
METRICS = {
    "val_acc_deployed": "deployed network",
    "val_acc_training": "training structure",
}


def _table(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CLIError(f"{where} must be a table of settings, not {value!r}")
    return value


def _tables(value: Any, where: str) -> list[dict[str, Any]]:
    """``[[where]]`` tables (a single ``[where]`` table is one of them)."""
    items = [value] if isinstance(value, dict) else value
    if not isinstance(items, list):
        raise CLIError(f"[[{where}]] must be tables, not {value!r}")
    return [_table(item, f"[[{where}]] #{i + 1}") for i, item in enumerate(items)]


def _settings(values: dict[str, Any], where: str) -> dict[str, Any]:
    """Run settings checked like ``neusub train`` checks them (``out`` and ``resume`` are the grid's)."""
    extra = sorted(set(values) & {"out", "resume"})
    if extra:
        raise CLIError(f"{where}: {extra} are set by the experiment itself; remove them")
    return check_values(values, where)


def run_name(settings: dict[str, Any]) -> str:
    """``key=value_key=value`` of a run's axis settings (its folder under ``DIR/runs``)."""
    return "_".join(f"{k}={v}" for k, v in settings.items()).replace("/", "-").replace(" ", "")


def expand_grid(spec: dict[str, Any]) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """``([(run name, settings)], axis fields)`` of a parsed GRID.toml, in grid order, no duplicates."""
    extra = sorted(set(spec) - {"base", "grid", "exclude"})
    if extra:
        raise CLIError(f"the grid file has unknown tables {extra}; use [base], [[grid]] and [[exclude]]")
    base = _settings(_table(spec.get("base", {}), "[base]"), "[base]")
    if "grid" not in spec:
        raise CLIError("the grid file has no [grid] (or [[grid]]) table of axes")
    grids = _tables(spec["grid"], "grid")
    excludes = [
        _settings(ex, f"[[exclude]] #{i + 1}")
        for i, ex in enumerate(_tables(spec.get("exclude", []), "exclude"))
    ]
    runs: dict[str, dict[str, Any]] = {}
    axis_fields: dict[str, None] = {}
    for index, grid in enumerate(grids):
        where = f"[[grid]] #{index + 1}"
        if not grid:
            raise CLIError(f"{where} has no axes; give it lists of values, e.g. seed = [0, 1]")
        axes = []
        for key, values in grid.items():
            if not isinstance(values, list) or not values:
                raise CLIError(f"{where}: axis {key!r} must be a non-empty list")
            options = [v if isinstance(v, dict) else {key: v} for v in values]
            for option in options:
                if not option:
                    raise CLIError(f"{where}: axis {key!r} has an empty table; each value must set a field")
                _settings(option, f"{where} axis {key!r}")
                axis_fields.update(dict.fromkeys(option))
            axes.append(options)
        for combination in itertools.product(*axes):
            own: dict[str, Any] = {}
            for option in combination:
                own.update(option)
            settings = {**base, **own}
            if any(all(settings.get(k) == v for k, v in ex.items()) for ex in excludes):
                continue
            name = run_name(own)
            if name in runs and runs[name] != settings:
                raise CLIError(
                    f"two runs of the grid would share the folder {name!r}: {_differ(runs[name], settings)}; "
                    "make the values differ by more than spaces and slashes"
                )
            runs.setdefault(name, settings)
    if not runs:
        raise CLIError("the grid yields no run (every combination is excluded); check [[exclude]]")
    return list(runs.items()), list(axis_fields)


def _differ(first: dict[str, Any], second: dict[str, Any]) -> str:
    keys = [k for k in {**first, **second} if first.get(k) != second.get(k)]
    return ", ".join(f"{k}={first.get(k)!r} vs {second.get(k)!r}" for k in keys)


def _settings_key(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k in RUN_FIELDS}


def _prepare(run_dir: Path, cfg: dict[str, Any]) -> str:
    """``done`` / ``finished`` (trained and deployed, no ``result.json`` yet) / ``resume`` / ``new``
    for a run folder; refuses one made with other settings.

    A run stopped before its first checkpoint is resumed too: ``neusub train --resume`` starts it
    again in place. Nothing is deleted here."""
    folder = RunFolder(run_dir)
    status = folder.status()
    if status in (STARTED, CHECKPOINTED, FINISHED):
        old = _settings_key(folder.saved_config())
        new = _settings_key(cfg)
        changed = {k: (old.get(k), new.get(k)) for k in new if old.get(k) != new.get(k)}
        if changed:
            raise CLIError(
                f"run {run_dir} was made with other settings ({changed}: saved, now); "
                "use another --out, or remove that run folder to redo it"
            )
        if (run_dir / "result.json").is_file():
            return "done"
        return "finished" if status == FINISHED else "resume"
    return "new"


def _equivalence_error(run_dir: Path) -> float | None:
    """The equivalence error of a finished run's checkpoint and ``deployed.pt`` (None without ``last.pt``)."""
    from .. import check_equivalence
    from .analyze import val_batches
    from .commands import load_run_model

    if not (run_dir / "last.pt").is_file():
        return None
    model, cfg, _, _ = load_run_model(str(run_dir))
    plain, *_ = load_run_model(str(run_dir / "deployed.pt"))
    return check_equivalence(model, val_batches(cfg, 64)[0][0], plain)


def run_one(name: str, settings: dict[str, Any], run_dir: str, threads: int) -> tuple[dict, str]:
    """Train (or resume) one run, evaluate its deployed network, write ``result.json``;
    ``(result, "done" | "finished" | "resume" | "new")`` (done: finished before, skipped;
    finished: trained before, only evaluated now). ``threads``: torch's intra-op threads, which
    decide how CPU sums are split, so the run's numbers depend on them (not on where it runs)."""
    from ..analysis import accuracy
    from .analyze import val_batches
    from .commands import load_run_model, train

    torch.set_num_threads(threads)
    path = Path(run_dir)
    state = _prepare(path, settings)
    if state == "done":
        return json.loads((path / "result.json").read_text()), state
    start = time.perf_counter()
    if state == "finished":  # never trained again: that would replace its results
        record = {"equivalence_error": _equivalence_error(path)}
    else:
        flags = {**settings, "out": str(path), "resume": state == "resume"}
        record = train({k: v for k, v in flags.items() if k in FIELDS}, progress=False)
    # The last epoch's record (a resumed run that had finished training returns none itself).
    last = epoch_records(path)[-1]
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
        "resumed": state != "new",
        "threads": threads,
    }
    atomic_save_json(result, path / "result.json")
    return result, state


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
    keys = [
        "name",
        "label",
        "val_acc_deployed",
        "val_acc_training",
        "train_acc",
        "equivalence_error",
        "train_seconds",
        "seed",
        "recipe",
        "connectivity",
        "stochastic",
        "guided",
        "model",
        "width_mult",
        "epochs",
        "train_samples",
        "val_samples",
    ]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue().encode()))


# ---------------------------------------------------------------------- command


def _die_with_parent(parent: int) -> None:
    """Worker initializer: a worker ends when the experiment process ends, even when that is
    killed (SIGKILL), instead of training on unsupervised into the run folders."""
    if sys.platform.startswith("linux"):  # the kernel signals us when the parent dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:  # elsewhere (and as a fallback): notice being re-parented
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _claim_experiment_folder(out_dir: Path) -> RunFolder:
    """The experiment folder: new, empty, or one this command made (it holds ``runs/``)."""
    folder = RunFolder(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"--out {out_dir} is a file; choose a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "runs").is_dir():
        raise CLIError(
            f"--out {out_dir} is a folder that is not empty and holds no experiment (no runs/); "
            "nothing was written there — choose a new or empty folder"
        )
    folder.create()
    return folder


def cmd_experiment(grid_file: str, out: str, jobs: int = 1, progress: bool = True, threads: int = 1) -> dict:
    """Train every run of the grid, ``jobs`` at a time, each with ``threads`` intra-op threads
    (fixed whatever ``jobs`` is: each run's numbers depend on its thread count)."""
    file = Path(grid_file)
    if not file.exists():
        raise CLIError(f"grid file {grid_file} does not exist")
    runs, axes = expand_grid(load_toml(file))
    for name, settings in runs:  # every run's settings must be valid before anything starts
        try:
            build_config(settings, {})
        except CLIError as err:
            raise CLIError(f"run {name}: {err}") from None
    for flag, value in (("--jobs", jobs), ("--threads", threads)):
        if value < 1:
            raise CLIError(f"{flag}={value} is out of range; use an integer >= 1")
    if not out.strip():
        raise CLIError("--out is empty; give the experiment folder")
    out_dir = Path(out)
    folder = _claim_experiment_folder(out_dir)
    with folder.locked("experiment folder"):
        try:
            (out_dir / "runs").mkdir(exist_ok=True)
        except OSError as err:
            raise CLIError(describe_os_error(err, f"create {out_dir / 'runs'}")) from None
        return _run_grid(file, out_dir, runs, axes, (jobs, threads), progress)


def _run_grid(
    file: Path, out_dir: Path, runs: list, axes: list[str], workers: tuple[int, int], progress: bool
) -> dict:
    jobs, threads = workers
    results: list[dict] = []
    start = time.perf_counter()

    def report(outcome: tuple[dict, str], done: int) -> None:
        result, state = outcome
        results.append(result)
        if progress:
            elapsed = time.perf_counter() - start
            accuracy = 100 * result["val_acc_deployed"]
            how = "finished earlier, skipped" if state == "done" else f"{result['train_seconds']:.0f} s"
            print(
                f"[{done}/{len(runs)}] {result['name']}: deployed {accuracy:.2f}% "
                f"({how}; {elapsed / 60:.1f} min so far)",
                flush=True,
            )

    tasks = [(name, settings, str(out_dir / "runs" / name), threads) for name, settings in runs]
    try:
        if jobs == 1:
            for i, task in enumerate(tasks):
                report(run_one(*task), i + 1)
        else:
            context = get_context("spawn")
            with ProcessPoolExecutor(jobs, context, _die_with_parent, (os.getpid(),)) as pool:
                futures = [pool.submit(run_one, *task) for task in tasks]
                for i, future in enumerate(futures):
                    report(future.result(), i + 1)
    except BrokenProcessPool as err:
        raise CLIError(
            f"a worker process died ({err}); finished runs are kept: run the same command again to resume"
        ) from None
    except (KeyboardInterrupt, Stopped) as stop:
        code = stop.exit_code if isinstance(stop, Stopped) else stop_code(stop)
        raise Stopped(
            f"experiment stopped; {len(results)} of {len(runs)} runs are finished and every run keeps its "
            "last checkpoint: run the same command again to resume",
            code,
        ) from None
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
