"""The training loop behind ``neusub train`` / ``neusub demo``: resumable, DDP-aware.

Everything random is either seeded per batch (data order and augmentation, see
:class:`~neusub.cli.data.SeededBatches`) or drawn from RNGs whose state is saved
in the checkpoint (model randomness: NS partitions, drop-path; mixup). A run
killed at any point and resumed with ``--resume`` therefore ends bit-identical
to an uninterrupted run (CPU, same thread count).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .. import create_model, deploy
from ..analysis import evaluate
from .checkpoint import FORMAT, atomic_save, atomic_write, finite_json, rng_state, safe_load, set_rng_state
from .config import TrainConfig, config_dict
from .data import DataInfo, SeededBatches, info_dict, load_dataset, take_subset
from .errors import CLIError
from .runfolder import METRICS

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
MODEL_FIELDS = ("model", "recipe", "connectivity", "act", "guided", "width_mult", "stem", "dataset")


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed() -> Dist:
    """Join the process group when started by torchrun (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world == 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(dist.get_rank(), world, device)


# create_model's options are TrainConfig fields of the same name, except these (keyword → field)
RENAMED_MODEL_OPTIONS = {"drop_path_rate": "drop_path"}
DATA_MODEL_OPTIONS = ("name", "num_classes", "kwargs")  # given by the run's data, not by an option


def model_options(cfg: TrainConfig) -> dict:
    """``create_model``'s keyword options, read from ``cfg`` by their names (one declaration:
    create_model's signature; tests check that every option has its field)."""
    names = [n for n in inspect.signature(create_model).parameters if n not in DATA_MODEL_OPTIONS]
    return {name: getattr(cfg, RENAMED_MODEL_OPTIONS.get(name, name)) for name in names}


def build_model(cfg: TrainConfig, info: DataInfo) -> nn.Module:
    kwargs = {**model_options(cfg), "num_classes": info.num_classes}
    if info.kind == "features":
        kwargs["in_features"] = info.in_chans
    else:
        kwargs["in_chans"] = info.in_chans
    try:
        return create_model(cfg.model, **kwargs)
    except ValueError as err:
        raise CLIError(str(err)) from None
    except (RuntimeError, MemoryError, OverflowError) as err:  # allocation of absurd sizes
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise CLIError(
            f"model {cfg.model!r} at --width-mult={cfg.width_mult} with {info.num_classes} classes cannot be "
            f"built ({reason}); use a smaller --width-mult"
        ) from None


def load_state(model: nn.Module, state: object, where: str) -> None:
    """``model.load_state_dict(state)``, or a ``CLIError`` that says which keys do not fit."""
    if not isinstance(state, dict):
        raise CLIError(f"{where} holds no state dict; use a file written by `neusub train` / `neusub deploy`")
    own = model.state_dict()

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [
        f"{k} {tuple(state[k].shape)} instead of {tuple(own[k].shape)}"
        for k in own
        if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape
    ]
    kinds = {"missing": missing, "unexpected": unexpected, "of another shape": reshaped}
    parts = [f"{len(keys)} {what} ({few(keys)})" for what, keys in kinds.items() if keys]
    if not parts:
        try:
            model.load_state_dict(state)
            return
        except (RuntimeError, TypeError, ValueError) as err:
            parts = [str(err).strip().splitlines()[-1][:160]]
    raise CLIError(
        f"{where} does not fit the model its config describes: keys {'; '.join(parts)}; "
        "it was made with other settings (another recipe or model?) or changed after it was written"
    )


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


class Trainer:
    """Build data, model, optimizer, schedule, loss (all from timm) and run the loop."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, env: Dist | None = None, progress: bool = True):
        from timm.data import Mixup
        from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        from timm.utils import ModelEmaV3

        self.cfg, self.run_dir, self.env, self.progress = cfg, run_dir, env or Dist(), progress
        _seed_everything(cfg.seed)
        preset = config_dict(cfg)
        self.train_set, self.val_set, self.info = load_dataset(
            cfg.dataset, cfg.data, preset, cfg.download, cfg.seed
        )
        self.train_set = take_subset(self.train_set, cfg.train_samples)
        self.val_set = take_subset(self.val_set, cfg.val_samples)
        if len(self.train_set) < 2 * self.env.world or len(self.val_set) == 0:
            raise CLIError(
                f"dataset {cfg.dataset!r} gives {len(self.train_set)} training and {len(self.val_set)} "
                f"validation samples; training needs at least 2 per process (BatchNorm) and validation 1"
            )
        self.batches = SeededBatches(self.train_set, cfg.batch_size, cfg.seed, self.env.rank, self.env.world)
        self.steps_per_epoch = self.batches.set_epoch(0)
        if self.steps_per_epoch == 0:
            raise CLIError(
                f"--batch-size={cfg.batch_size} leaves no batch per epoch; use a smaller batch size"
            )

        model = build_model(cfg, self.info).to(self.env.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.sync_bn and self.env.world > 1:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        self.optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer,
            sched="cosine",
            num_epochs=cfg.epochs,
            min_lr=cfg.min_lr,
            warmup_lr=cfg.warmup_lr,
            warmup_epochs=min(cfg.warmup_epochs, max(cfg.epochs - 1, 0)),
            step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch,
        )
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=self.info.num_classes,
            )
        if cfg.bce is not None:
            self.loss_fn: nn.Module = BinaryCrossEntropy(
                smoothing=cfg.label_smoothing, target_threshold=cfg.bce
            )
        elif self.mixup is not None:
            self.loss_fn = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.loss_fn = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.loss_fn = nn.CrossEntropyLoss()
        self.ema = ModelEmaV3(model, decay=cfg.ema) if cfg.ema > 0 else None
        use_cuda_amp = cfg.amp and self.env.device.type == "cuda"
        self.amp_dtype = torch.float16 if use_cuda_amp else torch.bfloat16
        self.scaler = torch.amp.GradScaler("cuda", enabled=use_cuda_amp)
        self.net: nn.Module = model
        if self.env.world > 1:
            ids = [self.env.device.index] if self.env.device.type == "cuda" else None
            # Inner BN shifts of composed branches get no gradient (it is exactly zero before a
            # training-mode BN, so the fast path leaves them out of the graph): let DDP skip them.
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.epoch, self.step, self.global_step = 0, 0, 0
        self.totals = {"loss": 0.0, "correct": 0, "count": 0}
        self.metric_lines = 0
        self.saved_step: int | None = None  # the global step of the last checkpoint written

    # ------------------------------------------------------------------ state

    def state(self) -> dict:
        return {
            "format": FORMAT,
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
        self._sync_buffers()
        if self.env.main:
            atomic_save(self.state(), self.run_dir / "last.pt")
        self.saved_step = self.global_step
        if self.env.world > 1:
            dist.barrier()

    def kept(self) -> str:
        """What a stopped run keeps, for messages."""
        if self.saved_step is None:
            return "no checkpoint was written yet (`neusub train --resume` starts the run again)"
        return f"the checkpoint of step {self.saved_step} is kept"

    def check_finite(self) -> None:
        """Refuse to go on (or save) with NaN / inf weights: the last good checkpoint stays."""
        for name, tensor in itertools.chain(self.model.named_parameters(), self.model.named_buffers()):
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CLIError(
                    f"the weights became non-finite (NaN or inf in {name}) by step {self.global_step}; "
                    f"{self.kept()}; lower --lr (or disable --amp) and start a new run"
                )

    def load(self, path: Path) -> None:
        ckpt = safe_load(path)
        missing = sorted(set(CHECKPOINT_KEYS) - set(ckpt))
        if missing:
            raise CLIError(
                f"checkpoint {path} lacks {missing}; it was not written by `neusub train` (or was changed); "
                "start a new run"
            )
        saved = ckpt["config"]
        if not isinstance(saved, dict):
            raise CLIError(f"checkpoint {path} holds no config; start a new run")
        for key in MODEL_FIELDS:
            was = saved.get(key, getattr(TrainConfig, key))  # a field newer than the checkpoint: its default
            if was != getattr(self.cfg, key):
                raise CLIError(
                    f"checkpoint {path} was trained with {key}={was!r}, "
                    f"not {getattr(self.cfg, key)!r}; "
                    "resume with the run's own settings (omit the flag) or start a new --out folder"
                )
        load_state(self.model, ckpt["model"], f"checkpoint {path}")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
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
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            raise CLIError(
                f"checkpoint {path} is malformed ({first}); it was not written by this version of "
                "`neusub train` (or was changed); start a new run"
            ) from None
        self.epoch, self.step, self.global_step, self.metric_lines = counters
        self.totals, self.saved_step = totals, self.global_step
        metrics = self.run_dir / METRICS
        if self.env.main and metrics.exists():  # drop lines logged after the checkpoint
            lines = metrics.read_text().splitlines(keepends=True)[: self.metric_lines]
            atomic_write(metrics, lambda handle: handle.write("".join(lines).encode()))

    def _sync_buffers(self) -> None:
        """BN running statistics from rank 0, so every rank holds the same model."""
        if self.env.world > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    def log(self, record: dict) -> None:
        if self.env.main:
            with open(self.run_dir / METRICS, "a") as handle:
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
            raise CLIError(
                f"the loss became {loss.item()} at step {self.global_step}; {self.kept()}; "
                "lower --lr (or disable --amp) and start a new run"
            )
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

    def ranks_identical(self) -> bool:
        """Whether every rank holds bit-identical parameters and buffers (True without DDP)."""
        if self.env.world == 1:
            return True
        state = torch.cat([t.detach().double().flatten().cpu() for t in self.model.state_dict().values()])
        gathered = [torch.empty_like(state) for _ in range(self.env.world)]
        dist.all_gather(gathered, state)
        return all(torch.equal(gathered[0], g) for g in gathered[1:])

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
                disable=not (self.progress and self.env.main and sys.stderr.isatty()),
                leave=False,
            )  # a bar only on a terminal: logs stay readable
            for x, y in bar:
                self.train_step(x, y)
                self.step += 1
                bar.set_postfix(loss=f"{self.totals['loss'] / self.totals['count']:.3f}")
                if self.global_step % self.cfg.ckpt_steps == 0 and self.step < n:
                    self.save()
                if stop_after is not None and self.global_step >= stop_after:
                    return {}
            self.check_finite()
            self._sync_buffers()
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
                record["ranks_identical"] = self.ranks_identical()
            if self.ema is not None:
                record["ema_val_acc"] = self.evaluate(self.ema.module)["val_acc"]
            self.log(record)
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


def write_plot(run_dir: Path) -> Path | None:
    """Loss and accuracy per epoch from metrics.jsonl → ``curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for line in (run_dir / METRICS).read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "epoch" in record:
            records.append({k: float("nan") if v is None else v for k, v in record.items()})
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
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


DEPLOYED_FORMAT = "neusub-deployed-v1"


def save_deployed(model: nn.Module, cfg: TrainConfig, info: DataInfo, path: Path) -> nn.Module:
    deployed = deploy(model)
    state = {
        "format": DEPLOYED_FORMAT,
        "config": config_dict(cfg),
        "info": info_dict(info),
        "state_dict": deployed.state_dict(),
    }
    atomic_save(state, path)
    return deployed
