"""The training loop behind ``neusub train`` / ``neusub demo``: resumable, DDP-aware.

Everything random is either seeded per batch (data order and augmentation, see
:class:`~neusub.cli.data.SeededBatches`) or drawn from RNGs whose state is saved
in the checkpoint (model randomness: NS partitions, drop-path; mixup). A run
killed at any point and resumed with ``--resume`` therefore ends bit-identical
to an uninterrupted run (CPU, same thread count).
"""

from __future__ import annotations

import itertools
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import deploy, saved
from ..analysis import evaluate
from ..files import first_line, signals_deferred
from ..saved import CHECKPOINT_FORMAT, DataInfo, info_dict
from . import distributed
from .checkpoint import atomic_save, atomic_write, finite_json, rng_state, set_rng_state, writing
from .config import TrainConfig, config_dict
from .data import SeededBatches, load_dataset, take_subset
from .distributed import Dist
from .errors import CLIError, library_refusals
from .runfolder import CONFIG, METRICS

CHECKPOINT_KEYS = (
    "format",
    "config",
    "info",
    "epoch",
    "step",
    "global_step",
    "totals",
    "metric_lines",
    "model",
    "optimizer",
    "scheduler",
    "scaler",
    "ema",
    "rng",
)
# the settings that shape the weights: a checkpoint resumes only under the same values
MODEL_FIELDS = ("model", "recipe", "connectivity", "act", "guided", "width_mult", "stem", "dataset")


def build_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    """The training structure of a run (:func:`neusub.saved.build_model`, refusals as ``CLIError``)."""
    with library_refusals():
        return saved.build_model(cfg, info)


def read_checkpoint(path: Path, cfg: TrainConfig) -> dict:
    """The training checkpoint at ``path``, checked: every key there, the model ``cfg`` describes."""
    with library_refusals():
        ckpt = saved.read(path, CHECKPOINT_FORMAT)
    missing = sorted(set(CHECKPOINT_KEYS) - set(ckpt))
    if missing:
        raise CLIError(
            f"checkpoint {path} lacks {missing}; it was not written by `neusub train` (or was changed); "
            "start a new run"
        )
    settings = ckpt["config"]
    if not isinstance(settings, dict):
        raise CLIError(f"checkpoint {path} holds no config; start a new run")
    for key in MODEL_FIELDS:
        was = settings.get(key, getattr(TrainConfig, key))  # a field newer than the checkpoint: its default
        if was != getattr(cfg, key):
            # A resume takes the run's config.json, and refuses flags that change these fields
            # before it gets here: the two files disagree, whatever the command line said.
            raise CLIError(
                f"checkpoint {path} was trained with {key}={was!r}, but {path.parent / CONFIG} records "
                f"{key}={getattr(cfg, key)!r}: they belong to different runs; nothing was changed — put "
                "the run's own last.pt (or config.json) back, or start a new --out folder"
            )
    return ckpt


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _datasets(cfg: TrainConfig, world: int) -> tuple:
    """``(train set, validation set, info)`` of the run, each at least what training needs."""
    train_set, val_set, info = load_dataset(cfg.dataset, cfg.data, config_dict(cfg), cfg.download, cfg.seed)
    train_set, val_set = take_subset(train_set, cfg.train_samples), take_subset(val_set, cfg.val_samples)
    if len(train_set) < 2 * world or len(val_set) == 0:
        raise CLIError(
            f"dataset {cfg.dataset!r} gives {len(train_set)} training and {len(val_set)} "
            f"validation samples; training needs at least 2 per process (BatchNorm) and validation 1"
        )
    return train_set, val_set, info


def _optimization(model: nn.Module, cfg: TrainConfig, steps_per_epoch: int) -> tuple:
    """timm's optimizer and its cosine schedule, stepped every update."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=cfg.epochs,
        min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr,
        warmup_epochs=min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)),
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return optimizer, scheduler


def _loss(cfg: TrainConfig, num_classes: int) -> tuple:
    """``(mixup or None, loss)``: timm's mixup / cutmix, and the loss its soft targets need."""
    from timm.data import Mixup
    from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            label_smoothing=cfg.label_smoothing,
            num_classes=num_classes,
        )
    if cfg.bce is not None:
        return mixup, BinaryCrossEntropy(smoothing=cfg.label_smoothing, target_threshold=cfg.bce)
    if mixup is not None:
        return mixup, SoftTargetCrossEntropy()
    if cfg.label_smoothing > 0:
        return mixup, LabelSmoothingCrossEntropy(cfg.label_smoothing)
    return mixup, nn.CrossEntropyLoss()


class Trainer:
    """Build data, model, optimizer, schedule, loss (all from timm) and run the loop."""

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        env: Dist | None = None,
        progress: bool = True,
        on_epoch: Callable[[dict], None] | None = None,
    ):
        from timm.utils import ModelEmaV3

        self.cfg, self.run_dir, self.env, self.progress = cfg, run_dir, env or Dist(), progress
        self.on_epoch = on_epoch  # called with each epoch's record, as metrics.jsonl gets it
        _seed_everything(cfg.seed)
        self.train_set, self.val_set, self.info = _datasets(cfg, self.env.world)
        self.batches = SeededBatches(self.train_set, cfg.batch_size, cfg.seed, self.env.rank, self.env.world)
        self.steps_per_epoch = self.batches.set_epoch(0)
        if self.steps_per_epoch == 0:
            raise CLIError(
                f"--batch-size={cfg.batch_size} leaves no batch per epoch; use a smaller batch size"
            )

        model = build_model(cfg, self.info).to(self.env.device)
        # Before SyncBatchNorm, whose forward needs a process group and a GPU, not meta tensors.
        find_unused = self.env.world > 1 and bool(
            distributed.ungraded_parameters(model, self.info.input_shape)
        )
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.env.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer, self.scheduler = _optimization(model, cfg, self.steps_per_epoch)
        self.mixup, self.loss_fn = _loss(cfg, self.info.num_classes)
        self.ema = ModelEmaV3(model, decay=cfg.ema) if cfg.ema > 0 else None
        use_cuda_amp = cfg.amp and self.env.device.type == "cuda"
        self.amp_dtype = torch.float16 if use_cuda_amp else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
        self.net = distributed.wrap(model, self.env, find_unused)  # what training steps call
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.totals = {"loss": 0.0, "correct": 0, "count": 0}
        self.metric_lines = 0
        self.saved_step: int | None = None  # the global step of the last checkpoint written

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": config_dict(self.cfg),
            "info": info_dict(self.info),
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "totals": dict(self.totals),
            "metric_lines": self.metric_lines,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng_state(),
        }

    def save(self) -> None:
        self.check_finite()
        distributed.broadcast_buffers(self.model, self.env)
        with signals_deferred():  # a Ctrl-C now stops the run after this checkpoint, and says so
            if self.env.main:
                atomic_save(self.state(), self.run_dir / "last.pt")
            self.saved_step = self.global_step
        distributed.barrier(self.env)

    def kept(self) -> str:
        """What a stopped run keeps, for messages."""
        if self.saved_step is None:
            return "no checkpoint was written yet (`neusub train --resume` starts the run again)"
        return f"the checkpoint of step {self.saved_step} is kept"

    def check_finite(self) -> None:
        """Refuse to go on (or save) with NaN / inf weights: the last good checkpoint stays."""
        for name, tensor in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise self.diverged(f"the weights became non-finite (NaN or inf in {name}) by step")

    def diverged(self, what: str) -> CLIError:
        """The error that stops a diverging run: what is kept, and the resume that continues it."""
        return CLIError(
            f"{what} {self.global_step}; {self.kept()}: continue at a lower learning rate with "
            f"`neusub train --resume --out {self.run_dir} --lr {self.cfg.lr / 10:.3g}` (or without --amp)"
        )

    def load(self, path: Path) -> None:
        """Continue from the checkpoint at ``path`` (written by :meth:`save` of this run)."""
        ckpt = read_checkpoint(path, self.cfg)
        with library_refusals():
            saved.load_weights(self.model, ckpt["model"], f"checkpoint {path}")
        # a resume at another peak lr (after a divergence) keeps the fresh schedule built for it
        new_lr = ckpt["config"].get("lr") != self.cfg.lr
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if not new_lr:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            if self.ema is not None and ckpt["ema"] is not None:
                self.ema.load_state_dict(ckpt["ema"])
            counters = [ckpt[k] for k in ("epoch", "step", "global_step", "metric_lines")]
            if not all(isinstance(c, int) and c >= 0 for c in counters):
                raise ValueError(f"bad counters {counters}")
            totals = {k: ckpt["totals"][k] for k in ("loss", "correct", "count")}
            set_rng_state(ckpt["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            first = first_line(err)
            raise CLIError(
                f"checkpoint {path} is malformed ({first}); it was not written by this version of "
                "`neusub train` (or was changed); start a new run"
            ) from None
        self.epoch, self.step, self.global_step, self.metric_lines = counters
        self.totals, self.saved_step = totals, self.global_step
        if new_lr:  # the optimizer's groups hold the old schedule's rates: set the new one's
            for group in self.optimizer.param_groups:
                group["initial_lr"] = self.cfg.lr
            self.scheduler.step_update(num_updates=self.global_step)
        metrics = self.run_dir / METRICS
        if self.env.main and metrics.exists():  # drop lines logged after the checkpoint
            lines = metrics.read_text().splitlines(keepends=True)[: self.metric_lines]
            atomic_write(metrics, lambda handle: handle.write("".join(lines).encode()))

    def log(self, record: dict) -> None:
        if self.env.main:
            with writing(self.run_dir / METRICS), open(self.run_dir / METRICS, "a") as handle:
                handle.write(finite_json(record) + "\n")
        self.metric_lines += 1

    # ------------------------------------------------------------------ loop

    def _autocast(self):
        return torch.autocast(self.env.device.type, dtype=self.amp_dtype, enabled=self.cfg.amp)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.env.device, non_blocking=True)
        return x.to(memory_format=torch.channels_last) if self.cfg.channels_last and x.dim() == 4 else x

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = self._to_device(x), y.to(self.env.device)
        target = y
        if self.mixup is not None:
            x, target = self.mixup(x, y)
        with self._autocast():
            logits = self.net(x)
            loss = self.loss_fn(logits, target)
        if not math.isfinite(loss.item()):
            raise self.diverged(f"the loss became {loss.item()} at step")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step)
        self.global_step += 1
        self.scheduler.step_update(num_updates=self.global_step)
        self.totals["loss"] += loss.item() * len(y)
        self.totals["correct"] += int((logits.argmax(1) == y).sum())
        self.totals["count"] += len(y)

    def _loader(self, dataset, **kwargs) -> DataLoader:
        # Its own generator: a DataLoader iterator otherwise draws a base seed from the global
        # RNG, which would shift every later draw of a resumed run by one.
        return DataLoader(dataset, num_workers=self.cfg.workers, generator=torch.Generator(), **kwargs)

    def evaluate(self, model: nn.Module | None = None) -> dict:
        loader = self._loader(self.val_set, batch_size=max(self.cfg.batch_size, 256))
        batches = ((self._to_device(x), y.to(self.env.device)) for x, y in loader)
        result = evaluate(model or self.net, batches, self._autocast)
        return {"val_loss": result["val_loss"], "val_acc": result["val_acc"]}

    def run(self, stop_after: int | None = None) -> dict:
        """Train to the last epoch (or, for tests, stop after ``stop_after`` global steps)."""
        from tqdm.auto import tqdm

        record: dict = {}
        self.net.train()
        while self.epoch < self.cfg.epochs:
            n = self.batches.set_epoch(self.epoch)
            loader = self._loader(self.batches, batch_size=None, sampler=range(self.step, n))
            start = time.perf_counter()
            bar = tqdm(
                loader,
                total=n,
                initial=self.step,
                desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}",
                disable=not (self.progress and self.env.main and _redraws_in_place()),
                leave=False,
            )
            for x, y in bar:
                self.train_step(x, y)
                self.step += 1
                bar.set_postfix(loss=f"{self.totals['loss'] / self.totals['count']:.3f}")
                if self.global_step % self.cfg.ckpt_steps == 0 and self.step < n:
                    self.save()
                if stop_after is not None and self.global_step >= stop_after:
                    return {}
            self.check_finite()
            distributed.broadcast_buffers(self.model, self.env)
            record = {
                "epoch": self.epoch + 1,
                "step": self.global_step,
                "train_loss": self.totals["loss"] / max(self.totals["count"], 1),
                "train_acc": self.totals["correct"] / max(self.totals["count"], 1),
                **self.evaluate(),
                "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_seconds": round(time.perf_counter() - start, 3),
            }
            if self.env.world > 1:
                record["ranks_identical"] = distributed.ranks_identical(self.model, self.env)
            if self.ema is not None:
                record["ema_val_acc"] = self.evaluate(self.ema.module)["val_acc"]
            self.log(record)
            if self.on_epoch is not None and self.env.main:
                self.on_epoch(dict(record))
            if self.progress and self.env.main:
                tqdm.write(
                    f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  "
                    f"train acc {record['train_acc']:.4f}  val acc {record['val_acc']:.4f}",
                    file=sys.stderr,  # stdout carries the JSON result
                )
            self.epoch, self.step = self.epoch + 1, 0
            self.totals = {"loss": 0.0, "correct": 0, "count": 0}
            self.save()
        return record


def _redraws_in_place() -> bool:
    """A terminal or a notebook, where a progress bar redraws in place (in a log file it
    would add a line at every step: there the per-epoch lines report progress)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def save_deployed(model: nn.Module, cfg: TrainConfig, info: DataInfo, path: Path) -> nn.Module:
    """``deploy(model)``, written to ``path`` as a :data:`neusub.saved.DEPLOYED_FORMAT` file."""
    deployed = deploy(model)
    write_deployed(deployed, cfg, info, path)
    return deployed


def write_deployed(
    deployed: nn.Module, cfg: TrainConfig, info: DataInfo, path: Path, overwrite: bool = True
) -> None:
    """The deployed network of a run, written to ``path`` as a :data:`neusub.saved.DEPLOYED_FORMAT`
    file (``overwrite=False``: an existing ``path`` is refused, see :func:`atomic_write`)."""
    state = {
        "format": saved.DEPLOYED_FORMAT,
        "config": config_dict(cfg),
        "info": info_dict(info),
        "state_dict": deployed.state_dict(),
    }
    atomic_save(state, path, overwrite)
