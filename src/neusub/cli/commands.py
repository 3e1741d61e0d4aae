"""The subcommands: train, demo, eval, deploy, export."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import nn

from .. import check_equivalence, deploy
from .checkpoint import FORMAT, atomic_save, atomic_save_json, atomic_write, safe_load
from .config import TrainConfig, build_config, config_dict, read_config_file
from .data import DataInfo, load_dataset
from .errors import CLIError
from .train import DEPLOYED_FORMAT, Trainer, build_model, save_deployed, setup_distributed, write_plot


def _check_run_dir(out: str, resume: bool) -> Path:
    """A new run folder, or an existing one only with ``--resume``; never overwrite a run."""
    run_dir = Path(out)
    has_run = (run_dir / "config.json").exists() or (run_dir / "last.pt").exists()
    if has_run and not resume:
        raise CLIError(
            f"run folder {run_dir} already holds a run; pass --resume to continue it or choose another --out"
        )
    if resume and not (run_dir / "last.pt").exists():
        raise CLIError(f"--resume: {run_dir / 'last.pt'} does not exist; start the run without --resume")
    if run_dir.exists() and not run_dir.is_dir():
        raise CLIError(f"--out {run_dir} is a file; choose a folder")
    return run_dir


def cmd_train(
    flags: dict, config_file: str | None, progress: bool = True, stop_after: int | None = None
) -> dict:
    file_values = read_config_file(config_file) if config_file else {}
    out = flags.get("out") or file_values.get("out") or TrainConfig.out
    resume = bool(flags.get("resume"))
    run_dir = _check_run_dir(out, resume)
    if resume:  # the run's own settings, then what the user states again explicitly
        file_values = json.loads((run_dir / "config.json").read_text())
    cfg = build_config(flags.get("preset") or file_values.get("preset"), file_values, {**flags, "out": out})
    env = setup_distributed()
    if env.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, run_dir, env, progress)
    if resume:
        trainer.load(run_dir / "last.pt")
    elif env.main:
        atomic_save_json(config_dict(cfg), run_dir / "config.json")
    record = trainer.run(stop_after)
    if stop_after is not None and trainer.epoch < cfg.epochs:
        return {"stopped_at_step": trainer.global_step}
    if env.main:
        deployed = save_deployed(trainer.model, cfg, trainer.info, run_dir / "deployed.pt")
        x = next(iter(torch.utils.data.DataLoader(trainer.val_set, batch_size=64)))[0].to(env.device)
        record["equivalence_error"] = check_equivalence(trainer.model, x, deployed)
        write_plot(run_dir)
    if env.world > 1:
        torch.distributed.destroy_process_group()
    return record if env.main else {}


# ---------------------------------------------------------------------- loading runs


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p / "last.pt" if p.is_dir() else p


def load_run_model(path: str) -> tuple[nn.Module, TrainConfig, DataInfo, bool]:
    """``(model, config, info, deployed?)`` from a training checkpoint or a deployed file."""
    file = _checkpoint_path(path)
    try:
        ckpt = safe_load(file, FORMAT)
        deployed = False
    except CLIError as first:
        try:
            ckpt = safe_load(file, DEPLOYED_FORMAT)
            deployed = True
        except CLIError:
            raise first from None
    cfg = TrainConfig(**ckpt["config"])
    info = DataInfo(**{**ckpt["info"], "input_shape": tuple(ckpt["info"]["input_shape"])})
    model = build_model(cfg, info)
    if deployed:
        model = deploy(model)
    state = ckpt["state_dict"] if deployed else ckpt["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CLIError(f"{file} does not match its own config ({str(err).splitlines()[0][:160]})") from None
    return model.eval(), cfg, info, deployed


def cmd_eval(path: str, dataset: str | None, data: str | None) -> dict:
    model, cfg, info, deployed = load_run_model(path)
    cfg.dataset, cfg.data = dataset or cfg.dataset, data or cfg.data
    _, val_set, _ = load_dataset(cfg.dataset, cfg.data, config_dict(cfg), False, cfg.seed)
    loader = torch.utils.data.DataLoader(val_set, batch_size=256)
    correct = count = 0
    loss = 0.0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    return {"val_acc": correct / count, "val_loss": loss / count, "samples": count, "deployed": deployed}


def _example_input(info: DataInfo, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *info.input_shape, generator=torch.Generator().manual_seed(0))


def cmd_deploy(path: str, out: str) -> dict:
    model, cfg, info, deployed = load_run_model(path)
    if deployed:
        raise CLIError(f"{path} is already a deployed network; pass a training checkpoint (last.pt)")
    target = Path(out)
    if target.exists():
        raise CLIError(f"{target} already exists; choose another output path (nothing was overwritten)")
    plain = save_deployed(model, cfg, info, target)
    error = check_equivalence(model, _example_input(info), plain)
    return {
        "out": str(target),
        "equivalence_error": error,
        "params_training": sum(p.numel() for p in model.parameters()),
        "params_deployed": sum(p.numel() for p in plain.parameters()),
    }


EXPORT_FORMATS = ("onnx", "torchvision", "torchscript")


def cmd_export(path: str, fmt: str, out: str | None) -> dict:
    from .. import export

    if fmt not in EXPORT_FORMATS:
        raise CLIError(f"unknown export format {fmt!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    model, cfg, info, deployed = load_run_model(path)
    suffix = {"onnx": ".onnx", "torchvision": ".tv.pt", "torchscript": ".ts.pt"}[fmt]
    target = Path(out) if out else _checkpoint_path(path).with_suffix(suffix)
    if target.exists():
        raise CLIError(f"{target} already exists; choose another --out (nothing was overwritten)")
    plain = model if deployed else deploy(model)
    example = _example_input(info, 1)
    if fmt == "onnx":
        try:
            export.to_onnx(plain, target, tuple(example.shape))
        except ImportError as err:
            raise CLIError(str(err)) from None
    elif fmt == "torchvision":
        if deployed:
            raise CLIError("torchvision export needs the training checkpoint (last.pt), not a deployed file")
        try:
            tv = export.to_torchvision(model)
        except ValueError as err:
            raise CLIError(str(err)) from None
        atomic_save({"arch": cfg.model, "state_dict": tv.state_dict()}, target)
    else:
        scripted = torch.jit.trace(plain, example)
        atomic_write(target, lambda handle: torch.jit.save(scripted, handle))
    return {"out": str(target), "format": fmt}


# ---------------------------------------------------------------------- demo


def _time_inference(model: nn.Module, x: torch.Tensor, repeats: int = 20) -> float:
    with torch.no_grad():
        model(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
    return (time.perf_counter() - start) / repeats


def cmd_demo(out: str | None, fast: bool, progress: bool = True) -> dict:
    """Train a small NS ResNet on digits, deploy it, and show that nothing changed but the cost."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    flags = dict(
        model="resnet18", recipe="nsnet", connectivity="ns", stochastic=1.0,
        width_mult=0.125 if fast else 0.25,
        stem="cifar", dataset="digits", epochs=1 if fast else 10, batch_size=128 if fast else 64,
        opt="adamw", lr=3e-3, weight_decay=5e-2,
        warmup_epochs=1, warmup_lr=1e-4, min_lr=1e-5, label_smoothing=0.0, drop_path=0.0,
        auto_augment=None, out=out or f"runs/demo-{stamp}",
    )  # fmt: skip
    start = time.perf_counter()
    record = cmd_train(flags, None, progress)
    run_dir = Path(flags["out"])
    model, cfg, info, _ = load_run_model(str(run_dir))
    plain, *_ = load_run_model(str(run_dir / "deployed.pt"))
    _, val_set, _ = load_dataset("digits", None, {}, False, cfg.seed)
    x, y = next(iter(torch.utils.data.DataLoader(val_set, batch_size=len(val_set))))
    with torch.no_grad():
        acc_train = float((model(x).argmax(1) == y).float().mean())
        acc_plain = float((plain(x).argmax(1) == y).float().mean())
    summary = {
        "run_dir": str(run_dir),
        "seconds": round(time.perf_counter() - start, 1),
        "train_acc": record["train_acc"],
        "val_acc_training_structure": acc_train,
        "val_acc_deployed": acc_plain,
        "equivalence_error": check_equivalence(model, x, plain),
        "params_training": sum(p.numel() for p in model.parameters()),
        "params_deployed": sum(p.numel() for p in plain.parameters()),
        "inference_ms_training": 1000 * _time_inference(model, x[:64], 2 if fast else 20),
        "inference_ms_deployed": 1000 * _time_inference(plain, x[:64], 2 if fast else 20),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
