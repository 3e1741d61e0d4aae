"""Command-line interface: ``neusub demo | train | eval | deploy | export | analyze | experiment``.

User errors print one line ``neusub: error: ...`` naming the problem and the fix,
and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import signal
import sys
import threading

from .. import __version__
from .config import FIELD_TYPES, FIELDS, TrainConfig
from .errors import CLIError, Stopped, Terminated, stop_code

# Only the standard library above: ``neusub --help`` and ``--version`` never import torch.


def on_off(text: str) -> bool:
    if text.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text.lower() in ("on", "true", "1")


def _add_train_flags(train: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, typed from its annotation (checked there)."""
    for option in dataclasses.fields(TrainConfig):
        flag, text = f"--{option.name.replace('_', '-')}", option.metadata["help"]
        if option.name not in ("preset", "resume") and "default" not in text:
            text += f" (default: {option.default})"
        base, _ = FIELD_TYPES[option.name]
        if base is bool and option.default is False:
            train.add_argument(flag, action="store_true", default=None, help=text)
        else:
            kind = on_off if base is bool else base
            train.add_argument(flag, type=kind, default=None, help=text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neusub", description="Neural Substitution re-parameterization.")
    parser.add_argument("--version", action="version", version=f"neusub {__version__}")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="train a small NS network on bundled digits, deploy, compare")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>)")
    demo.add_argument("--fast", action="store_true", help="one epoch (for smoke tests)")

    train = sub.add_parser(
        "train",
        help="train a model (resumable)",
        description="Train a model into a run folder (resumable with --resume). The defaults below fit a "
        "short run; a preset (--preset, or the dataset's: cifar100 and imagefolder get the paper's "
        "recipes, features the vlm one) replaces those it sets. config.json records what ran.",
    )
    train.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    _add_train_flags(train)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt

    ev = sub.add_parser("eval", help="validation accuracy of a checkpoint, deployed file or exported .onnx")
    ev.add_argument(
        "checkpoint", help="run folder, last.pt, deployed.pt, or an .onnx file from neusub export"
    )
    ev.add_argument("--dataset", help="the dataset to evaluate on (default: the run's)")
    ev.add_argument("--data", help="dataset path (default: the run's)")
    ev.add_argument(
        "--samples", type=int, default=0, help="a fixed subset of this many images (default 0: all)"
    )
    as_trained = "evaluate a training checkpoint as trained, not deployed (slower, same outputs)"
    ev.add_argument("--training-structure", action="store_true", help=as_trained)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    dep = sub.add_parser("deploy", help="save the deployed (plain) network; prints the equivalence error")
    dep.add_argument("checkpoint")
    dep.add_argument("out")

    exp = sub.add_parser("export", help="export the deployed network")
    exp.add_argument("checkpoint")
    exp.add_argument("--format", required=True, help="onnx | torchvision | torchscript")
    exp.add_argument("--out", help="output file (default: beside the checkpoint)")
    exp.add_argument(
        "--int8", action="store_true", help="onnx: also write <out>.int8.onnx, quantized (static PTQ)"
    )
    calibration = "--int8: training inputs that calibrate the activation ranges (default 512)"
    exp.add_argument("--calibration-samples", type=int, default=512, help=calibration)

    ana = sub.add_parser("analyze", help="similarity, kernels, block drop or topology of runs (PNG + JSON)")
    ana.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="run folders or checkpoints (compared)")
    ana.add_argument(
        "--what", required=True, help="similarity | kernels | block-drop | topology | statistics"
    )
    ana.add_argument("--out", help="output folder (default: <first run>/analysis)")
    ana.add_argument("--samples", type=int, default=2000, help="validation samples used (default 2000)")

    grid = sub.add_parser("experiment", help="run a grid of trainings from a TOML file; tables + CSV")
    grid.add_argument("grid", metavar="GRID.toml")
    grid.add_argument("--out", required=True, help="experiment folder (re-run to resume)")
    grid.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; default 1)")
    threads = "torch threads of each run (default 1); a run's numbers depend on it, never on --jobs"
    grid.add_argument("--threads", type=int, default=1, help=threads)
    return parser


def _run(args: argparse.Namespace) -> dict:
    from . import commands

    if args.command == "demo":
        return commands.cmd_demo(args.out, args.fast)
    if args.command == "train":
        flags = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
        return commands.cmd_train(flags, args.config, progress=not args.quiet, stop_after=args.stop_after)
    if args.command == "eval":
        return commands.cmd_eval(
            args.checkpoint,
            args.dataset,
            args.data,
            args.samples,
            args.training_structure,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    if args.command == "deploy":
        return commands.cmd_deploy(args.checkpoint, args.out)
    if args.command == "analyze":
        from .analyze import cmd_analyze

        return cmd_analyze(args.runs, args.what, args.out, args.samples)
    if args.command == "experiment":
        from .experiment import cmd_experiment

        return cmd_experiment(args.grid, args.out, args.jobs, threads=args.threads)
    return commands.cmd_export(args.checkpoint, args.format, args.out, args.int8, args.calibration_samples)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def __getattr__(name: str):
    """``neusub.cli.train``: loaded on first use (it imports torch; the parser does not)."""
    if name == "train":
        from .commands import train

        return train
    raise AttributeError(f"module 'neusub.cli' has no attribute {name!r}")


# What the command line needs beyond the library (the `cli` extra): import name → package
CLI_PACKAGES = {"matplotlib": "matplotlib", "tqdm": "tqdm", "sklearn": "scikit-learn"}


def _check_cli_packages() -> None:
    missing = [package for name, package in CLI_PACKAGES.items() if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(
            f"the command line needs {', '.join(missing)} (the 'cli' extra); "
            "install it with: pip install 'neusub[cli]'"
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        _check_cli_packages()
        result = _run(args)
    except CLIError as err:
        print(f"neusub: error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        print(f"neusub: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt as stop:
        print("neusub: interrupted", file=sys.stderr)
        return stop_code(stop)
    except OSError as err:  # a file system refusal the command did not foresee
        from .errors import describe_os_error

        print(f"neusub: error: {describe_os_error(err, 'use')}", file=sys.stderr)
        return 2
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if result:
        from .checkpoint import finite_json

        print(finite_json(result, indent=2))
    return 0
