"""Command-line interface: ``neusub demo | train | eval | deploy | export | analyze | experiment``.

User errors print one line ``neusub: error: ...`` naming the problem and the fix,
and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from .. import __version__
from .config import FIELDS, PRESETS
from .data import DATASETS
from .errors import CLIError


def on_off(text: str) -> bool:
    if text.lower() not in ("on", "off", "true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text.lower() in ("on", "true", "1")


_TRAIN_FLAGS: list[tuple[str, object, str]] = [
    ("model", str, "model name (neusub.list_models())"),
    ("recipe", str, "recipe name (neusub.list_recipes()); default: the model's"),
    ("connectivity", str, "block | ns | naive"),
    ("stochastic", float, "probability of re-drawing the NS partition per step"),
    ("neural-drop", float, "probability of dropping a (stream, branch) pair"),
    ("act", str, "activation (guided under ns)"),
    ("guided", "on_off", "guided activation: on | off (off: the paper's ablation, deploy not exact)"),
    ("width-mult", float, "channel width multiplier"),
    ("stem", str, "cifar | imagenet"),
    ("dataset", str, "one of " + ", ".join(DATASETS)),
    ("data", str, "dataset path"),
    ("train-samples", int, "train on a fixed subset of this many samples (0: all)"),
    ("val-samples", int, "validate on a fixed subset of this many samples (0: all)"),
    ("epochs", int, "training epochs"),
    ("batch-size", int, "batch size per process"),
    ("lr", float, "peak learning rate"),
    ("opt", str, "timm optimizer name (lamb, adamw, sgd, ...)"),
    ("weight-decay", float, "weight decay"),
    ("warmup-epochs", int, "linear warm-up epochs"),
    ("label-smoothing", float, "label smoothing"),
    ("mixup", float, "mixup alpha"),
    ("cutmix", float, "cutmix alpha"),
    ("drop-path", float, "stochastic depth rate"),
    ("ema", float, "EMA decay (0 = off)"),
    ("seed", int, "random seed"),
    ("workers", int, "data loader workers"),
    ("ckpt-steps", int, "checkpoint every N steps (and every epoch)"),
    ("out", str, "run folder"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neusub", description="Neural Substitution re-parameterization.")
    parser.add_argument("--version", action="version", version=f"neusub {__version__}")
    sub = parser.add_subparsers(dest="command")

    demo = sub.add_parser("demo", help="train a small NS network on bundled digits, deploy, compare")
    demo.add_argument("--out", help="run folder (default runs/demo-<time>)")
    demo.add_argument("--fast", action="store_true", help="one epoch (for smoke tests)")

    train = sub.add_parser("train", help="train a model (resumable)")
    train.add_argument("--config", help="JSON or TOML file of settings; flags override it")
    train.add_argument("--preset", help="the paper's Appendix B hyper-parameters: " + ", ".join(PRESETS))
    for flag, kind, text in _TRAIN_FLAGS:
        train.add_argument(f"--{flag}", type=on_off if kind == "on_off" else kind, default=None, help=text)
    switches = [
        ("resume", "continue the run in --out"), ("download", "download CIFAR"), ("amp", "mixed precision"),
        ("channels-last", "channels_last memory format"), ("compile", "torch.compile the model"),
        ("sync-bn", "SyncBatchNorm under DDP"),
    ]  # fmt: skip
    for flag, text in switches:
        train.add_argument(f"--{flag}", action="store_true", default=None, help=text)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)  # tests: interrupt

    ev = sub.add_parser("eval", help="validation accuracy of a checkpoint or deployed file")
    ev.add_argument("checkpoint")
    ev.add_argument("--dataset", help="one of " + ", ".join(DATASETS))
    ev.add_argument("--data")

    dep = sub.add_parser("deploy", help="save the deployed (plain) network; prints the equivalence error")
    dep.add_argument("checkpoint")
    dep.add_argument("out")

    exp = sub.add_parser("export", help="export the deployed network")
    exp.add_argument("checkpoint")
    exp.add_argument("--format", required=True, help="onnx | torchvision | torchscript")
    exp.add_argument("--out")

    ana = sub.add_parser("analyze", help="similarity, kernels, block drop or topology of runs (PNG + JSON)")
    ana.add_argument("runs", nargs="+", metavar="RUN_OR_CKPT", help="run folders or checkpoints (compared)")
    ana.add_argument("--what", required=True, help="similarity | kernels | block-drop | topology")
    ana.add_argument("--out", help="output folder (default: <first run>/analysis)")
    ana.add_argument("--samples", type=int, default=2000, help="validation samples used (default 2000)")

    grid = sub.add_parser("experiment", help="run a grid of trainings from a TOML file; tables + CSV")
    grid.add_argument("grid", metavar="GRID.toml")
    grid.add_argument("--out", required=True, help="experiment folder (re-run to resume)")
    grid.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes; default 1)")
    return parser


def _run(args: argparse.Namespace) -> dict:
    from . import commands

    if args.command == "demo":
        return commands.cmd_demo(args.out, args.fast)
    if args.command == "train":
        flags = {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}
        return commands.cmd_train(flags, args.config, progress=not args.quiet, stop_after=args.stop_after)
    if args.command == "eval":
        return commands.cmd_eval(args.checkpoint, args.dataset, args.data)
    if args.command == "deploy":
        return commands.cmd_deploy(args.checkpoint, args.out)
    if args.command == "analyze":
        from .analyze import cmd_analyze

        return cmd_analyze(args.runs, args.what, args.out, args.samples)
    if args.command == "experiment":
        from .experiment import cmd_experiment

        return cmd_experiment(args.grid, args.out, args.jobs)
    return commands.cmd_export(args.checkpoint, args.format, args.out)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        result = _run(args)
    except CLIError as err:
        print(f"neusub: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("neusub: interrupted; continue with --resume", file=sys.stderr)
        return 130
    if result:
        print(json.dumps(result, indent=2))
    return 0
