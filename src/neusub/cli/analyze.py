"""``neusub analyze RUN [RUN ...] --what similarity|kernels|block-drop|topology|statistics``.

Each analysis of :mod:`neusub.analysis` on one or more runs (run folders or
checkpoints), written as ``<what>.json`` and ``<what>.png`` into ``--out``
(default: ``<first run>/analysis``). Several runs are drawn in one figure, labelled
by recipe and connectivity, so NS and block runs can be compared side by side.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from .. import analysis, deploy
from .checkpoint import atomic_save_json, atomic_write
from .commands import load_run_model
from .config import TrainConfig, config_dict
from .data import load_dataset, take_subset
from .errors import CLIError, describe_os_error
from .names import ANALYSES, unknown_name
from .plots import pyplot, run_label
from .trainer import build_model


def val_batches(
    cfg: TrainConfig, samples: int, batch_size: int = 256
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    _, val_set, _ = load_dataset(cfg.dataset, cfg.data, config_dict(cfg), False, cfg.seed)
    val_set = take_subset(val_set, samples)
    return list(torch.utils.data.DataLoader(val_set, batch_size=batch_size))


def _analyze_one(path: str, what: str, samples: int) -> tuple[str, dict]:
    model, cfg, info, deployed = load_run_model(path)
    if deployed and what != "block-drop":
        raise CLIError(f"--what {what} needs the training checkpoint (a run folder or last.pt), not {path}")
    try:
        if what == "similarity":
            x = val_batches(cfg, min(samples, 256))[0][0]
            result: dict = {"layers": analysis.branch_similarity(model, x)}
        elif what == "kernels":
            result = {"stages": analysis.kernel_magnitudes(model)}
        elif what == "statistics":  # the trained network and the same run's network at initialisation
            x = val_batches(cfg, min(samples, 256))[0][0]
            torch.manual_seed(cfg.seed)
            result = {
                "trained": analysis.branch_statistics(model, x),
                "init": analysis.branch_statistics(build_model(cfg, info), x),
            }
        elif what == "block-drop":
            plain = model if deployed else deploy(model)
            result = analysis.block_drop(plain, val_batches(cfg, samples))
        else:
            ns_model = build_model(TrainConfig(**{**config_dict(cfg), "connectivity": "ns"}), info)
            result = analysis.topology(ns_model)
    except ValueError as err:
        raise CLIError(str(err)) from None
    return run_label(cfg), {"run": str(path), "config": config_dict(cfg), **result}


def cmd_analyze(paths: list[str], what: str, out: str | None, samples: int = 2000) -> dict:
    if what not in ANALYSES:
        raise CLIError(unknown_name("analysis", what, ANALYSES))
    if samples < 1:
        raise CLIError(f"--samples={samples} is out of range; use an integer >= 1")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise CLIError(f"--out {out} is a file; choose a folder for {what}.json and {what}.png")
    runs: dict[str, dict] = {}
    for path in paths:
        label, result = _analyze_one(path, what, samples)
        while label in runs:  # two runs of one setting (seeds): keep both
            label += "'"
        runs[label] = result
    first = Path(paths[0])
    out_dir = Path(out) if out else (first if first.is_dir() else first.parent) / "analysis"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(describe_os_error(err, f"create {out_dir}")) from None
    stem = what.replace("-", "_")
    atomic_save_json(runs, out_dir / f"{stem}.json")
    figure = PLOTS[what](runs)
    atomic_write(out_dir / f"{stem}.png", lambda handle: figure.savefig(handle, format="png", dpi=110))
    pyplot().close(figure)
    return {"json": str(out_dir / f"{stem}.json"), "png": str(out_dir / f"{stem}.png"), "runs": list(runs)}


# ---------------------------------------------------------------------- plots


def _plot_similarity(runs: dict[str, dict]):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    for i, (label, run) in enumerate(runs.items()):
        layers, style = run["layers"], dict(marker="o", ms=3, color=f"C{i}", label=label)
        depth = range(1, len(layers) + 1)
        axes[0].plot(depth, [r["branch"] for r in layers], **style)
        streams = [(d, r["stream"]) for d, r in zip(depth, layers) if r["stream"] is not None]
        if streams:
            axes[1].plot(*zip(*streams), **style)
    axes[0].set_title("between branches (same input stream)")
    axes[1].set_title("between output streams")
    for ax in axes:
        ax.set_xlabel("re-parameterized layer (depth)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cosine similarity")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _kernel_rows(runs: dict[str, dict]) -> list[tuple[str, dict, str | None]]:
    """``(row label, run, branch)`` per row: each run's deployed kernels (branch None), then
    one row per branch before fusion."""
    rows: list[tuple[str, dict, str | None]] = []
    for label, run in runs.items():
        branches = dict.fromkeys(b for stage in run["stages"].values() for b in stage["branches"])
        rows += [(f"{label}\ndeployed", run, None), *((f"{label}\n{b}", run, b) for b in branches)]
    return rows


def _kernel_map(run: dict, stage: str, branch: str | None) -> list[list[float]] | None:
    """The map of ``branch`` (None: the deployed kernel) in ``stage``, None where there is none."""
    entry = run["stages"].get(stage, {})
    return entry.get("fused") if branch is None else entry.get("branches", {}).get(branch)


def _plot_kernels(runs: dict[str, dict]):
    """A grid of small maps, one row per (run, deployed or branch), one column per stage, on one
    colour scale, so that maps compare by colour across the whole figure."""
    from matplotlib.colors import PowerNorm

    plt = pyplot()
    stages = sorted({s for run in runs.values() for s in run["stages"]})
    rows = _kernel_rows(runs)
    kernels = [[_kernel_map(run, stage, branch) for stage in stages] for _, run, branch in rows]
    top = max(max(map(max, k)) for row in kernels for k in row if k is not None)
    # One scale for all; a square root spreads the shares near 1/k² (most maps) apart, which a
    # linear scale that also shows a 1×1 branch's single 1.0 would paint alike.
    norm = PowerNorm(0.5, vmin=0.0, vmax=top)
    fig, axes = plt.subplots(
        len(rows),
        len(stages),
        figsize=(0.9 * len(stages) + 2.6, 0.85 * len(rows) + 0.8),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for row, (label, _, _) in enumerate(rows):
        for col, stage in enumerate(stages):
            ax, kernel = axes[row][col], kernels[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if kernel is not None:
                image = ax.imshow(kernel, cmap="viridis", norm=norm)
            else:  # this run has no such branch (or stage) there: say so rather than draw an empty frame
                ax.set_frame_on(False)
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=7, color="grey")
            if row == 0:
                ax.set_title(stage, fontsize=8)
            if col == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.colorbar(image, ax=axes, shrink=0.5, label="share of |w| per position (square-root scale)")
    fig.suptitle(
        "k×k kernels, deployed and per branch: mean |w| per position (each map sums to 1;\n"
        "none: no layer of the stage has that branch)",
        fontsize=9,
    )
    return fig


def _plot_block_drop(runs: dict[str, dict]):
    plt = pyplot()
    blocks = [b["block"] for b in next(iter(runs.values()))["blocks"]]
    fig, ax = plt.subplots(
        figsize=(max(6.0, 0.9 * len(blocks)), 3.4 + 0.25 * len(runs)), layout="constrained"
    )
    width = 0.8 / len(runs)
    for i, (label, run) in enumerate(runs.items()):
        drops = {b["block"]: 100 * b["drop"] for b in run["blocks"]}
        xs = [j + i * width for j in range(len(blocks))]
        ax.bar(
            xs,
            [drops.get(b, float("nan")) for b in blocks],
            width,
            label=f"{label} (validation accuracy {100 * run['baseline']:.2f}%)",
        )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(blocks))], blocks, rotation=30, fontsize=8)
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title("validation accuracy lost when one residual block is removed", fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center")  # below the bars, never over them
    return fig


def _plot_topology(runs: dict[str, dict]):
    """One panel per run: the (stream, branch) pairs each layer computes under each connectivity."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.6), sharey=True, squeeze=False)
    for ax, (label, run) in zip(axes[0], runs.items()):
        rows = [r for r in run["layers"] if r["branches"] > 1]
        depth = range(1, len(rows) + 1)
        for connectivity in ("naive", "ns", "block"):
            ax.plot(depth, [r[connectivity]["pairs"] for r in rows], marker="o", ms=3, label=connectivity)
        ax.set_yscale("log")
        ax.set_xlabel("re-parameterized layer (depth)")
        totals = run["totals"]
        ax.set_title(
            f"{label}: paths block {totals['paths']['block']}, branch-level "
            f"10^{totals['log10_paths']['ns']:.1f}",
            fontsize=9,
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("(stream, branch) pairs computed")
    fig.tight_layout()
    return fig


def _plot_statistics(runs: dict[str, dict]):
    """Per run, σ_pooled / σ_sum per layer, averaged over branches (bars: spread over partitions)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for i, (label, run) in enumerate(runs.items()):
        for when, style in (("init", ":"), ("trained", "-")):
            layers = [r for r in run[when] if r["branches"]]
            means = [statistics.fmean(b["ratio"] for b in r["branches"].values()) for r in layers]
            spreads = [statistics.fmean(b["spread"] for b in r["branches"].values()) for r in layers]
            depth = range(1, len(layers) + 1)
            ax.errorbar(
                depth,
                means,
                yerr=spreads,
                linestyle=style,
                marker="o",
                ms=3,
                capsize=2,
                color=f"C{i}",
                label=f"{label} ({when})",
            )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("re-parameterized layer (depth)")
    ax.set_ylabel("σ pooled over streams / σ of the stream sum")
    ax.set_title(
        "what each branch's BatchNorm divides by under NS, relative to block (mean over branches)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


PLOTS = {
    "similarity": _plot_similarity,
    "kernels": _plot_kernels,
    "block-drop": _plot_block_drop,
    "topology": _plot_topology,
    "statistics": _plot_statistics,
}
