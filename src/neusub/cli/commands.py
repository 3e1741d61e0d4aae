"""The subcommands: train, demo, eval, deploy, export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import check_equivalence, deploy, saved
from ..analysis import accuracy, evaluate
from ..cost import training_cost
from ..models import default_recipe
from ..saved import DataInfo, info_dict, info_from_dict
from .checkpoint import atomic_save, atomic_save_json, atomic_write, writing
from .config import (
    RESUME_CHANGES,
    TrainConfig,
    build_config,
    check_value,
    config_dict,
    config_from_dict,
    read_config_file,
    read_settings_text,
    refuse_unknown_settings,
    short_run_warnings,
)
from .data import load_dataset
from .distributed import finish, setup_distributed
from .errors import CLIError, Stopped, library_refusals, stop_code
from .names import EXPORT_FORMATS, unknown_name
from .plots import write_plot
from .runfolder import ABSENT, CHECKPOINTED, CONFIG, EMPTY, FINISHED, STARTED, RunFolder
from .trainer import Trainer, save_deployed, write_deployed


def _resume_config(folder: RunFolder, explicit: dict) -> tuple[TrainConfig, dict]:
    """The run's saved config with the explicit settings a resume may change (``RESUME_CHANGES``);
    ``(config, {key: (old, new)})``. Any other change is refused: it would not be this run."""
    saved = config_dict(config_from_dict(folder.saved_config(), str(folder.config_file)))
    asked = {key: check_value(key, value) for key, value in explicit.items() if key not in ("out", "resume")}
    changes = {key: (saved[key], value) for key, value in asked.items() if saved[key] != value}
    refused = [
        f"{key}={new!r} (the run has {old!r})"
        for key, (old, new) in changes.items()
        if key not in RESUME_CHANGES
    ]
    if refused:
        raise CLIError(
            f"--resume continues {folder.path} with its own settings: {', '.join(refused)} cannot change "
            f"(a resume may change only {', '.join(RESUME_CHANGES)}); omit them, or start a new --out"
        )
    values = {**saved, **{key: new for key, (_, new) in changes.items()}}
    return TrainConfig(**{**values, "out": str(folder.path), "resume": True}), changes


def _claim_run_folder(folder: RunFolder, resume: bool) -> str:
    """The folder's status, refusing what this train command may not write into."""
    status = folder.status()
    folder.refuse_foreign()
    if status == FINISHED:  # whatever else is missing: training again would replace its results
        written = " and ".join(folder.finished_files())
        raise CLIError(
            f"run folder {folder.path} already holds a run, finished ({written} written); training "
            "there, with --resume or not, would replace its results, so nothing was changed — evaluate "
            f"it with `neusub eval {folder.path}`, or train again (or for more epochs) with another --out"
        )
    if status in (STARTED, CHECKPOINTED) and not resume:
        raise CLIError(
            f"run folder {folder.path} already holds a run; "
            "pass --resume to continue it or choose another --out"
        )
    if resume and status in (ABSENT, EMPTY):
        state = "does not exist" if status == ABSENT else "is empty"
        raise CLIError(f"--resume: {folder.path} {state}: no run to continue; start the run without --resume")
    return status


def cmd_train(
    flags: dict, config_file: str | None, progress: bool = True, stop_after: int | None = None
) -> dict:
    """``neusub train``: the config file's values, then the flags given (``None``: not given)."""
    file_values = read_config_file(config_file) if config_file else {}
    return train({**file_values, **{k: v for k, v in flags.items() if v is not None}}, progress, stop_after)


def train(
    options: Mapping[str, Any] | TrainConfig,
    progress: bool = True,
    stop_after: int | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict:
    """Train one run into the folder ``options["out"]`` (with ``resume``: continue it) and
    deploy it; what ``neusub train`` and ``neusub experiment`` run, callable from a notebook.

    ``options``: option values by name as the command line takes them (``{"dataset": "digits",
    "epochs": 3, "out": "runs/x"}``; the rest from the dataset's preset, then the defaults),
    or a built :class:`TrainConfig`. ``progress``: what the command prints on stderr (what
    trains and its cost, a line per epoch; a bar in a terminal or notebook). ``on_epoch``:
    called with each epoch's record (as ``metrics.jsonl`` gets it). Returns the final record
    (metrics, equivalence error). Refusals are :class:`CLIError` with a sentence; nothing
    already written is lost."""
    explicit = config_dict(options) if isinstance(options, TrainConfig) else dict(options)
    refuse_unknown_settings(explicit, "train()")
    out = check_value("out", explicit.get("out", TrainConfig.out))
    resume = bool(explicit.get("resume"))
    folder = RunFolder(out)
    main = int(os.environ.get("RANK", "0")) == 0  # DDP: rank 0 owns the folder, the others follow
    cfg = None if resume else build_config({}, {**explicit, "out": out})  # checked before any write
    if not main:
        status = _claim_run_folder(folder, resume) if resume else folder.status()
        cfg, _ = _resume_config(folder, explicit) if resume else (cfg, {})
        return _train_in(folder, cfg, status, {}, (progress, on_epoch), stop_after)
    _claim_run_folder(folder, resume)
    created = folder.create()
    try:
        with folder.locked():
            status = _claim_run_folder(folder, resume)  # again, now that no one else can write
            changes: dict = {}
            if resume:
                cfg, changes = _resume_config(folder, explicit)
            removed = folder.remove_temp_files()
            if progress and removed:
                print(
                    f"neusub: removed {len(removed)} temporary file(s) of an interrupted save",
                    file=sys.stderr,
                )
            return _train_in(folder, cfg, status, changes, (progress, on_epoch), stop_after)
    except BaseException:
        if created and folder.path.is_dir() and not any(folder.path.iterdir()):
            folder.path.rmdir()  # made by this call and still empty: leave no trace
        raise


def _train_in(
    folder: RunFolder,
    cfg: TrainConfig,
    status: str,
    changes: dict,
    reporting: tuple[bool, Callable[[dict], None] | None],
    stop_after: int | None,
) -> dict:
    """Train ``cfg`` in ``folder`` (claimed and locked by the caller on rank 0); ``reporting``:
    ``(progress, on_epoch)`` of :func:`train`."""
    progress, on_epoch = reporting
    env = setup_distributed()
    trainer = Trainer(cfg, folder.path, env, progress, on_epoch)
    if status == CHECKPOINTED:
        trainer.load(folder.checkpoint)
    if env.main and progress:
        print(f"neusub: {_what_trains(cfg, trainer)}", file=sys.stderr)
    if env.main:
        if status != CHECKPOINTED or changes:
            atomic_save_json(config_dict(dataclasses.replace(cfg, resume=False)), folder.config_file)
        if status != CHECKPOINTED:  # a new run, or one stopped before its first checkpoint: from scratch
            atomic_write(folder.metrics, lambda handle: None)
            for problem in short_run_warnings(cfg, trainer.steps_per_epoch):
                print(f"neusub: warning: {problem}", file=sys.stderr)
        if progress and status == STARTED:
            print(
                f"neusub: {folder.path} stopped before its first checkpoint; starting it again",
                file=sys.stderr,
            )
        if progress and changes:
            said = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            print(f"neusub: resuming with {said} (recorded in config.json)", file=sys.stderr)
    try:
        record = trainer.run(stop_after)
    except KeyboardInterrupt as stop:
        raise Stopped(
            f"stopped at step {trainer.global_step}; {trainer.kept()}: continue with "
            f"`neusub train --resume --out {folder.path}`",
            stop_code(stop),
        ) from None
    if stop_after is not None and trainer.epoch < cfg.epochs:
        return {"stopped_at_step": trainer.global_step}
    if env.main:
        deployed = save_deployed(trainer.model, cfg, trainer.info, folder.path / "deployed.pt")
        x = next(iter(torch.utils.data.DataLoader(trainer.val_set, batch_size=64)))[0].to(env.device)
        record["equivalence_error"] = check_equivalence(trainer.model, x, deployed)
        write_plot(folder.path, cfg)
    finish(env)
    return record if env.main else {}


def _what_trains(cfg: TrainConfig, trainer: Trainer) -> str:
    """``training <model> (<recipe>, <connectivity>) on <dataset>, <n> steps: <cost>``: the first
    line of a run, so that its cost is known before it starts."""
    structure = f"{cfg.recipe or default_recipe(cfg.model)}, {cfg.connectivity}"
    if cfg.connectivity != "block" and cfg.stochastic:
        structure += f", stochastic {cfg.stochastic:g}"
    steps = trainer.steps_per_epoch * cfg.epochs
    head = f"training {cfg.model} ({structure}) on {cfg.dataset}, {steps} steps"
    try:
        cost = training_cost(trainer.model, trainer.info.input_shape)
    except Exception:  # an estimate: a model that cannot run on meta tensors trains all the same
        return head
    return f"{head}: {cost.describe(cfg.batch_size)}"


# ---------------------------------------------------------------------- loading runs


def _checkpoint_path(path: str) -> Path:
    p = Path(path)
    return p / "last.pt" if p.is_dir() else p


def load_run_model(path: str) -> tuple[nn.Module, TrainConfig, DataInfo, bool]:
    """``(model, config, info, deployed?)`` from a training checkpoint, a deployed file or a
    torchvision export (then the model is the ``torchvision.models.ResNet``). Weights that hold
    NaN or inf are refused: nothing a command computes from them would mean anything."""
    file = _checkpoint_path(path)
    _refuse_torchscript(file)
    with library_refusals():
        ckpt = saved.read(file, saved.MODEL_FORMATS)
        settings, info = saved.settings_of(ckpt, file)
    cfg = config_from_dict(settings, f"{file}: config")
    if Path(path).is_dir():
        _refuse_another_runs_checkpoint(Path(path), cfg)
    with library_refusals():
        model = saved.model_from(ckpt, cfg, info, str(file))
        saved.refuse_non_finite(model.state_dict(), str(file))
    return model, cfg, info, ckpt["format"] != saved.CHECKPOINT_FORMAT


def _refuse_torchscript(file: Path) -> None:
    """A TorchScript archive (``export --format torchscript``) is named as such: running it means
    running the code it holds, which neusub never does with a file it reads."""
    try:
        with zipfile.ZipFile(file) as archive:
            scripted = any("/code/__torch__/" in name for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return  # not a zip archive: saved.read says what it is
    if scripted:
        raise CLIError(
            f"{file} is a TorchScript file (`neusub export --format torchscript`), which neusub does not "
            "read back: loading it runs the code it holds — evaluate the run folder, its deployed.pt or an "
            "ONNX export, or load this file with torch.jit.load where you trust it"
        )


def _refuse_another_runs_checkpoint(run_dir: Path, cfg: TrainConfig) -> None:
    """A run folder's ``last.pt`` must be the run its ``config.json`` records (a resume may have
    changed the settings of ``RESUME_CHANGES`` since the checkpoint was written)."""
    try:
        recorded = json.loads(read_settings_text(run_dir / CONFIG))
    except (CLIError, ValueError):
        return  # no readable config.json: the checkpoint's own settings are all there is
    if not isinstance(recorded, dict):
        return
    ours = config_dict(cfg)
    differ = [
        f"{key}={ours[key]!r} in last.pt, {recorded[key]!r} in {CONFIG}"
        for key in recorded
        if key in ours and key not in (*RESUME_CHANGES, "out", "resume") and recorded[key] != ours[key]
    ]
    if differ:
        raise CLIError(
            f"{run_dir / 'last.pt'} belongs to another run than {run_dir / CONFIG} "
            f"({'; '.join(differ[:3])}); nothing was evaluated — restore the run's own last.pt, or pass "
            "the file itself to use it as it is"
        )


ONNX_CONFIG, ONNX_INFO = "neusub.config", "neusub.info"  # metadata keys of exported ONNX files


def _load_onnx_model(path: str) -> tuple[object, TrainConfig, DataInfo, str]:
    """``(callable, config, info, kind)`` of an ONNX file written by ``neusub export``."""
    from .. import export

    try:
        model = export.OnnxModel(path)
    except (ImportError, ValueError) as err:
        raise CLIError(str(err)) from None
    if ONNX_CONFIG not in model.metadata or ONNX_INFO not in model.metadata:
        raise CLIError(
            f"{path} has no neusub run configuration in its metadata (it was not written by "
            "neusub export); evaluate a file from neusub export, or the run's checkpoint"
        )
    try:
        cfg = config_from_dict(json.loads(model.metadata[ONNX_CONFIG]), f"{path}: metadata")
        with library_refusals():
            info = info_from_dict(json.loads(model.metadata[ONNX_INFO]), f"{path}: metadata")
    except json.JSONDecodeError as err:
        raise CLIError(f"{path}: its neusub metadata is not valid JSON ({err})") from None
    _refuse_another_graph(model, info, path)
    bad = model.non_finite_weights()
    if bad:
        raise CLIError(
            f"{path} holds non-finite weights (NaN or inf in {bad[0]}); its outputs would be meaningless — "
            "export the run's last checkpoint again (`neusub train` keeps only finite ones)"
        )
    return model, cfg, info, "onnx-int8" if model.quantized else "onnx"


def _refuse_another_graph(model, info: DataInfo, path: str) -> None:
    """The graph must be the network the file's neusub metadata describes: a float input of a
    dynamic batch of the run's samples, and float logits, one per class."""
    outputs = model.session.get_outputs()
    declared = model.input_shape
    if (
        tuple(declared[1:]) != tuple(info.input_shape)
        or isinstance(declared[0], int)
        or tuple(model.sample_output_shape or ()) != (1, info.num_classes)
        or outputs[0].type != "tensor(float)"
    ):
        sample = ", ".join(map(str, info.input_shape))
        raise CLIError(
            f"{path} carries the neusub metadata of a network from inputs (batch, {sample}) to "
            f"{info.num_classes} float logits, but its graph takes {tuple(declared)} and gives "
            f"{outputs[0].type} of shape {model.sample_output_shape} per sample: the metadata belongs to "
            "another file — evaluate the file `neusub export` wrote"
        )


def cmd_eval(
    path: str,
    dataset: str | None,
    data: str | None,
    samples: int = 0,
    training_structure: bool = False,
    progress: bool = True,
) -> dict:
    """Validation metrics of a run, checkpoint, deployed / torchvision file or exported ONNX file.
    A training checkpoint is evaluated deployed (the same function, at the plain network's cost)
    unless ``training_structure``; ``samples`` > 0: a fixed subset of the validation set."""
    if samples < 0:
        raise CLIError(f"--samples {samples}: use a positive count, or 0 for the whole validation set")
    if Path(path).suffix == ".onnx":
        model, cfg, info, kind = _load_onnx_model(path)
    else:
        model, cfg, info, deployed = load_run_model(path)
        kind = "deployed" if deployed else "training structure"
        if not deployed and not training_structure:
            model, kind = deploy(model), "deployed"
    if dataset is not None:
        check_value("dataset", dataset)
    cfg.dataset, cfg.data = dataset or cfg.dataset, data or cfg.data
    _, val_set, data_info = load_dataset(cfg.dataset, cfg.data, config_dict(cfg), False, cfg.seed)
    if tuple(data_info.input_shape) != tuple(info.input_shape) or data_info.num_classes > info.num_classes:
        raise CLIError(
            f"{path} takes inputs of shape {tuple(info.input_shape)} with {info.num_classes} classes, but "
            f"dataset {cfg.dataset!r} has {tuple(data_info.input_shape)} "
            f"with {data_info.num_classes} classes; "
            "evaluate it on data like its training data (--dataset / --data)"
        )
    from tqdm.auto import tqdm

    from .data import take_subset

    loader = torch.utils.data.DataLoader(take_subset(val_set, samples), batch_size=256)
    batches = tqdm(loader, desc=f"eval ({kind})", disable=not progress, leave=False)
    with library_refusals():  # an ONNX file onnxruntime cannot run on this data
        result = evaluate(model, batches)
    if not math.isfinite(result["val_loss"]):
        raise CLIError(
            f"{path} outputs NaN or inf on the validation data of {cfg.dataset!r} (accuracy "
            f"{result['val_acc']:.4f} on {result['samples']} samples is meaningless); its weights or "
            "statistics are broken — evaluate an earlier checkpoint"
        )
    return {
        "val_acc": result["val_acc"],
        "val_loss": result["val_loss"],
        "samples": result["samples"],
        "model": kind,
    }


def _example_input(info: DataInfo, batch: int = 4) -> torch.Tensor:
    return torch.randn(batch, *info.input_shape, generator=torch.Generator().manual_seed(0))


def cmd_deploy(path: str, out: str) -> dict:
    model, cfg, info, deployed = load_run_model(path)
    if deployed:
        raise CLIError(f"{path} is already a deployed network; pass a training checkpoint (last.pt)")
    target = Path(out)
    if target.exists():
        raise CLIError(f"{target} already exists; choose another output path (nothing was overwritten)")
    plain = deploy(model)
    with library_refusals():  # outputs that overflow: refused before anything is written
        error = check_equivalence(model, _example_input(info), plain)
    write_deployed(plain, cfg, info, target, overwrite=False)  # another deploy may race this one
    return {
        "out": str(target),
        "equivalence_error": error,
        "params_training": sum(p.numel() for p in model.parameters()),
        "params_deployed": sum(p.numel() for p in plain.parameters()),
    }


def _calibration_batches(cfg: TrainConfig, samples: int, batch: int = 64) -> list[torch.Tensor]:
    """``samples`` training inputs of the run (its fixed subset, without augmentation)."""
    from .data import take_subset

    train_set, _, _ = load_dataset(cfg.dataset, cfg.data, config_dict(cfg), False, cfg.seed, augment=False)
    subset = take_subset(take_subset(train_set, cfg.train_samples), samples)
    loader = torch.utils.data.DataLoader(subset, batch_size=batch)
    return [x for x, _ in loader]


def cmd_export(
    path: str, fmt: str, out: str | None, int8: bool = False, calibration_samples: int = 512
) -> dict:
    from .. import export

    if fmt not in EXPORT_FORMATS:
        raise CLIError(unknown_name("export format", fmt, EXPORT_FORMATS))
    if int8 and fmt != "onnx":
        raise CLIError(f"--int8 quantizes ONNX files; use --format onnx (not {fmt})")
    if int8 and calibration_samples < 1:
        raise CLIError(f"--calibration-samples {calibration_samples}: calibration needs at least 1 sample")
    model, cfg, info, deployed = load_run_model(path)
    suffix = {"onnx": ".onnx", "torchvision": ".tv.pt", "torchscript": ".ts.pt"}[fmt]
    target = Path(out) if out else _checkpoint_path(path).with_suffix(suffix)
    if fmt == "onnx" and target.suffix != ".onnx":
        target = target.with_name(target.name + ".onnx")
        said = f"writing {target}: eval and neusub.load know an ONNX file by its suffix"
        print(f"neusub: {said}", file=sys.stderr)
    quantized = target.with_name(f"{target.stem}.int8{target.suffix or '.onnx'}")
    for file in [target, quantized] if int8 else [target]:
        if file.exists():
            raise CLIError(f"{file} already exists; choose another --out (nothing was overwritten)")
    plain = model if deployed else deploy(model)
    example = _example_input(info, 1)
    if fmt == "onnx":
        return _export_onnx(plain, cfg, info, target, quantized if int8 else None, calibration_samples)
    if fmt == "torchvision":
        if deployed:
            raise CLIError("torchvision export needs the training checkpoint (last.pt), not a deployed file")
        with library_refusals():
            tv = export.to_torchvision(model)
        state = {
            "format": saved.TORCHVISION_FORMAT,
            "arch": cfg.model,
            "state_dict": tv.state_dict(),
            "config": config_dict(cfg),
            "info": info_dict(info),
        }
        atomic_save(state, target, overwrite=False)  # another export may race this one
    else:
        with warnings.catch_warnings():  # TorchScript's deprecation notices: the file is still what was asked
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.trace(plain, example)
            atomic_write(target, lambda handle: torch.jit.save(scripted, handle), overwrite=False)
    return {"out": str(target), "format": fmt}


def _export_onnx(
    plain: nn.Module, cfg: TrainConfig, info: DataInfo, target: Path, quantized: Path | None, samples: int
) -> dict:
    """``export --format onnx [--int8]``: the float file (and the INT8 one); never one without the other."""
    from .. import export

    metadata = {ONNX_CONFIG: json.dumps(config_dict(cfg)), ONNX_INFO: json.dumps(info_dict(info))}
    with library_refusals(), writing(target):
        try:
            export.to_onnx(plain, target, (1, *info.input_shape), metadata=metadata, overwrite=False)
        except ImportError as err:
            raise CLIError(str(err)) from None
    if quantized is None:
        return {"out": str(target), "format": "onnx"}
    try:
        batches = _calibration_batches(cfg, samples)
        with library_refusals(), writing(quantized):
            export.to_onnx_int8(target, quantized, batches, overwrite=False)
    except BaseException:
        target.unlink(missing_ok=True)  # this command wrote it: an --int8 export that failed leaves neither
        raise
    return {
        "out": str(target),
        "int8": str(quantized),
        "calibration_samples": sum(map(len, batches)),
        "format": "onnx",
    }


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
        model="resnet18",
        recipe="nsnet",
        connectivity="ns",
        stochastic=1.0,
        width_mult=0.125 if fast else 0.25,
        stem="cifar",
        dataset="digits",
        epochs=1 if fast else 10,
        batch_size=128 if fast else 64,
        opt="adamw",
        lr=3e-3,
        weight_decay=5e-2,
        warmup_epochs=1,
        warmup_lr=1e-4,
        min_lr=1e-5,
        label_smoothing=0.0,
        drop_path=0.0,
        auto_augment=None,
        out=out or f"runs/demo-{stamp}",
    )
    start = time.perf_counter()
    record = train(flags, progress)
    run_dir = Path(flags["out"])
    model, cfg, info, _ = load_run_model(str(run_dir))
    plain, *_ = load_run_model(str(run_dir / "deployed.pt"))
    _, val_set, _ = load_dataset("digits", None, {}, False, cfg.seed)
    x, y = next(iter(torch.utils.data.DataLoader(val_set, batch_size=len(val_set))))
    acc_train, acc_plain = accuracy(model, [(x, y)]), accuracy(plain, [(x, y)])
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
    atomic_save_json(summary, run_dir / "summary.json")
    return summary
