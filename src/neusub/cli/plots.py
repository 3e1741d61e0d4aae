"""A run's curves: loss and accuracy per epoch, from its metrics, as ``curves.png``."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write
from .runfolder import epoch_records


def write_plot(run_dir: Path) -> Path | None:
    """Loss and accuracy per epoch → ``run_dir/curves.png`` (None: no epoch finished)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = epoch_records(run_dir)
    if not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for split in ("train", "val"):  # markers: a one-epoch run is one point per curve
        ax_loss.plot(epochs, [r[f"{split}_loss"] for r in records], marker="o", label=split)
        ax_acc.plot(epochs, [r[f"{split}_acc"] for r in records], marker="o", label=split)
    losses = [r[key] for r in records for key in ("train_loss", "val_loss")]
    if all(isinstance(v, float) and v > 0 for v in losses):
        ax_loss.set_yscale("log")  # one early outlier would flatten a linear axis
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    path = run_dir / "curves.png"
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=100))
    plt.close(fig)
    return path
