"""Command-line interface: ``neusub demo | train | eval | deploy | export | analyze | experiment``.

User errors print one line ``neusub: error: ...`` naming the problem and the fix,
and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import signal
import sys
import threading

from .. import __version__
from . import names
from .config import FIELD_TYPES, FIELDS, TrainConfig, check_value, parse_flag, read_config_file
from .errors import CLIError, Stopped, Terminated, stop_code
from .names import ANALYSES, DATASETS, EXPORT_FORMATS, did_you_mean, unknown_name

# Only the standard library above: ``neusub --help`` and ``--version`` never import torch, and
# every name and value is checked before torch loads (seconds), so a typo is refused at once.


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), no abbreviated options (``--epoch`` is not
    ``--epochs``) and a "did you mean" for options it does not know."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.commands: dict[str, argparse.ArgumentParser] = {}

    def error(self, message: str):
        raise CLIError(f"{message} (see `{self.prog} --help`)")

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        if self.commands and args and not args[0].startswith("-") and args[0] not in self.commands:
            raise CLIError(unknown_name("command", args[0], tuple(self.commands)))
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(parsed, "command", None) or "", self)
            raise CLIError(_unknown_argument(command, extras[0]))
        return parsed


def _unknown_argument(parser: argparse.ArgumentParser, argument: str) -> str:
    see = f"(see `{parser.prog} --help`)"
    if not argument.startswith("-"):
        return f"unexpected argument {argument!r} {see}"
    flag = argument.split("=", 1)[0]
    hint = did_you_mean(flag, [option for action in parser._actions for option in action.option_strings])
    return f"{parser.prog} has no option {flag}{';' + hint if hint else ''} {see}"


def _choice(what: str, choices: tuple[str, ...]):
    """An argparse type: one of ``choices``, else a one-line error with the closest."""

    def parse(text: str) -> str:
        if text not in choices:
            raise CLIError(unknown_name(what, text, choices))
        return text

    return parse


def _count(flag: str, minimum: int, why: str = ""):
    """An argparse type: an integer >= ``minimum``, else a one-line error naming ``flag`` (and
    ``why`` it needs that many)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise CLIError(f"{flag} {text!r} is not an integer") from None
        if value < minimum:
            raise CLIError(f"{flag}={value} is out of range; {why or f'use an integer >= {minimum}'}")
        return value

    return parse


def _add_train_flags(train: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field, typed from its annotation (checked there)."""
    choices = {"model": names.models(), "recipe": names.recipes(), "act": names.activations()}
    choices["dataset"] = DATASETS
    shown = {True: "on", False: "off"}  # as the flags spell booleans
    for option in dataclasses.fields(TrainConfig):
        flag, text = f"--{option.name.replace('_', '-')}", option.metadata["help"]
        if option.name in choices:
            text += f"; one of {', '.join(choices[option.name])}"
        if option.name not in ("preset", "resume") and "default" not in text:
            default = shown[option.default] if isinstance(option.default, bool) else option.default
            text += f" (default: {default})"
        base, _ = FIELD_TYPES[option.name]
        if base is bool and option.default is False:
            train.add_argument(flag, action="store_true", default=None, help=text)
        else:
            kind = functools.partial(parse_flag, option.name)
            train.add_argument(flag, type=kind, default=None, help=text)


THREADS_HELP = "torch's CPU threads (default: one per core); on a shared machine, fewer run faster"


def build_parser() -> _Parser:
    parser = _Parser(prog="neusub", description="Neural Substitution re-parameterization.")
    parser.add_argument("--version", action="version", version=f"neusub {__version__}")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="train a small NS network on bundled digits, deploy, compare")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>)")
    demo.add_argument("--fast", action="store_true", help="one epoch (for smoke tests)")
    demo.add_argument("--threads", type=_count("--threads", 1), help=THREADS_HELP)

    train = sub.add_parser(
        "train",
        help="train a model (resumable)",
        description="Train a model into a run folder (resumable with --resume). The defaults below fit a "
        "short run; a preset (--preset, or the dataset's: cifar100 and imagefolder get the paper's "
        "recipes, features the vlm one) replaces those it sets. config.json records what ran.",
    )
    train.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    _add_train_flags(train)
    train.add_argument("--threads", type=_count("--threads", 1), help=THREADS_HELP)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt

    ev = sub.add_parser("eval", help="validation accuracy of a checkpoint, deployed file or exported .onnx")
    ev.add_argument(
        "checkpoint", help="run folder, last.pt, deployed.pt, or an .onnx file from neusub export"
    )
    ev.add_argument(
        "--dataset", type=_choice("dataset", DATASETS), help="the dataset to evaluate on (default: the run's)"
    )
    ev.add_argument("--data", help="dataset path (default: the run's)")
    ev.add_argument(
        "--samples",
        type=_count("--samples", 0),
        default=0,
        help="a fixed subset of this many images (default 0: all)",
    )
    as_trained = "evaluate a training checkpoint as trained, not deployed (slower, same outputs)"
    ev.add_argument("--training-structure", action="store_true", help=as_trained)
    ev.add_argument("--quiet", action="store_true", help="no progress bar")

    dep = sub.add_parser("deploy", help="save the deployed (plain) network; prints the equivalence error")
    dep.add_argument("checkpoint")
    dep.add_argument("out")

    exp = sub.add_parser("export", help="export the deployed network")
    exp.add_argument("checkpoint")
    exp.add_argument(
        "--format",
        required=True,
        type=_choice("export format", EXPORT_FORMATS),
        help=" | ".join(EXPORT_FORMATS),
    )
    exp.add_argument(
        "--out", help="output file (default: beside the checkpoint; the format's suffix is added)"
    )
    exp.add_argument(
        "--int8", action="store_true", help="onnx: also write <out>.int8.onnx, quantized (static PTQ)"
    )
    calibration = "--int8: training inputs that calibrate the activation ranges (default 512)"
    exp.add_argument(
        "--calibration-samples",
        type=_count("--calibration-samples", 1, "calibration needs at least 1 sample"),
        default=512,
        help=calibration,
    )

    ana = sub.add_parser("analyze", help=f"what trained runs learned: {', '.join(ANALYSES)} (PNG + JSON)")
    ana.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="run folders or checkpoints (compared)")
    ana.add_argument("--what", required=True, type=_choice("analysis", ANALYSES), help=" | ".join(ANALYSES))
    ana.add_argument("--out", help="output folder (default: <first run>/analysis)")
    ana.add_argument(
        "--samples", type=_count("--samples", 1), default=2000, help="validation samples used (default 2000)"
    )

    for command in (ev, exp, ana):  # the commands that compute with torch in this process
        command.add_argument("--threads", type=_count("--threads", 1), help=THREADS_HELP)

    grid = sub.add_parser("experiment", help="run a grid of trainings from a TOML file; tables + CSV")
    grid.add_argument("grid", metavar="GRID.toml")
    grid.add_argument("--out", required=True, help="experiment folder (re-run to resume)")
    grid.add_argument(
        "--jobs", type=_count("--jobs", 1), default=1, help="runs in parallel (processes; default 1)"
    )
    threads = "torch threads of each run (default 1); a run's numbers depend on it, never on --jobs"
    grid.add_argument("--threads", type=_count("--threads", 1), default=1, help=threads)
    parser.commands = sub.choices
    return parser


def _check_before_torch(args: argparse.Namespace) -> None:
    """Every setting of ``neusub train`` that can be checked without torch (argparse checked
    the other commands' values): a bad name or value is refused in a fraction of a second."""
    if args.command != "train":
        return
    if args.config:
        read_config_file(args.config, before_torch=True)
    for key, value in _train_flags(args).items():
        check_value(key, value, before_torch=True)


def _train_flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}


def _run(args: argparse.Namespace) -> dict:
    from . import commands

    if args.command != "experiment" and getattr(args, "threads", None) is not None:  # experiment: per run
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "demo":
        return commands.cmd_demo(args.out, args.fast)
    if args.command == "train":
        flags = _train_flags(args)
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
    try:
        args = parser.parse_args(argv)
        if args.command is not None:
            _check_before_torch(args)
    except CLIError as err:
        print(f"neusub: error: {err}", file=sys.stderr)
        return 2
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
