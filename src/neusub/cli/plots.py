"""A run's curves: loss and accuracy per epoch, from its metrics, as ``curves.png``; and the
label that names a run in plots and tables."""

from __future__ import annotations

from pathlib import Path

from ..models import default_recipe
from .checkpoint import atomic_write
from .config import TrainConfig
from .runfolder import epoch_records


def run_label(cfg: TrainConfig) -> str:
    """``dbb ns+stoch`` / ``nsnet block`` / ``nsnet ns unguided``: how a run is named in plots and tables."""
    label = f"{cfg.recipe or default_recipe(cfg.model)} {cfg.connectivity}"
    if cfg.connectivity != "block" and cfg.stochastic > 0:
        label += "+stoch" if cfg.stochastic == 1 else f"+stoch{cfg.stochastic:g}"
    if not cfg.guided:
        label += " unguided"
    return label


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only: no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(run_dir: Path, cfg: TrainConfig) -> Path | None:
    """Loss and accuracy per epoch → ``run_dir/curves.png`` (None: no epoch finished)."""
    records = epoch_records(run_dir)
    if not records:
        return None
    fig = curves_figure(records, f"{run_dir.name}: {cfg.model} {run_label(cfg)} on {cfg.dataset}")
    path = run_dir / "curves.png"
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    pyplot().close(fig)
    return path


def curves_figure(records: list[dict], title: str):
    """Train and validation loss and accuracy of the epoch ``records`` (``metrics.jsonl``)."""
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = pyplot().subplots(1, 2, figsize=(9, 3.8))
    for split, name in (("train", "train"), ("val", "validation")):  # markers: one epoch is one point
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], marker="o", label=name)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in records], marker="o", label=name)
    losses = [r[key] for r in records for key in ("train_loss", "val_loss")]
    if all(isinstance(v, float) and v > 0 for v in losses):
        ax_loss.set_yscale("log")  # one early outlier would flatten a linear axis
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 2.5
        ax.set_title(name)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
