"""INT8 cost of every recipe × connectivity: static post-training quantization of the runs of
``experiments/int8.toml``, and one full-width ResNet-18.

    python experiments/int8.py runs/int8              # per-run CSV + markdown tables
    python experiments/int8.py --full-width runs/int8 # + a full-width ResNet-18 (random inputs)

Per run: ``neusub export RUN --format onnx --int8 --calibration-samples 512`` (files under
``RUN/int8/``, reused when present), then the deployed fp32 network and the INT8 file evaluated on
all 10,000 Fashion-MNIST test images, and the range statistics of the deployed network that
explain the drop:

- ``w_outlier``: per output channel of each fused kernel, max|w| / rms(w) (how far the largest
  weight sits above the typical one; per-channel INT8 spends its 255 steps on that range),
  mean over channels and layers;
- ``w_spread``: per layer, the largest channel's max|w| over the median channel's (what per-tensor
  weight quantization would pay), mean over layers;
- ``a_outlier``: per conv output (pre-activation, per tensor, as INT8 activations are quantized),
  max|a| / std(a) on the calibration images, mean over layers.

``drop, per-tensor weights`` repeats the quantization with one weight scale per layer.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

import neusub
from neusub import export
from neusub.cli.commands import _calibration_batches, cmd_eval, cmd_export, load_run_model

CALIBRATION = 512


def weight_stats(plain: nn.Module) -> tuple[float, float]:
    outliers, spreads = [], []
    for module in plain.modules():
        if isinstance(module, nn.Conv2d):
            w = module.weight.detach().flatten(1).double()
            peak = w.abs().amax(1)
            rms = w.square().mean(1).sqrt().clamp_min(1e-12)
            outliers.append(float((peak / rms).mean()))
            spreads.append(float(peak.max() / peak.median().clamp_min(1e-12)))
    return statistics.fmean(outliers), statistics.fmean(spreads)


def activation_outlier(plain: nn.Module, batches: list[torch.Tensor]) -> float:
    outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = [
        module.register_forward_hook(
            lambda m, a, out, name=name: outputs[name].append(out.detach().flatten())
        )
        for name, module in plain.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    with torch.no_grad():
        for x in batches:
            plain(x)
    for hook in hooks:
        hook.remove()
    ratios = []
    for values in outputs.values():
        a = torch.cat(values).double()
        ratios.append(float(a.abs().max() / a.std().clamp_min(1e-12)))
    return statistics.fmean(ratios)


def measure_run(run: Path) -> dict:
    folder = run / "int8"
    folder.mkdir(exist_ok=True)
    float_file, int8_file = folder / "model.onnx", folder / "model.int8.onnx"
    if not int8_file.exists():
        for stale in (float_file, int8_file):
            stale.unlink(missing_ok=True)
        cmd_export(str(run), "onnx", str(float_file), int8=True, calibration_samples=CALIBRATION)
    model, cfg, *_ = load_run_model(str(run))
    plain = neusub.deploy(model)
    batches = _calibration_batches(cfg, CALIBRATION)
    per_tensor = folder / "model.int8-per-tensor.onnx"
    if not per_tensor.exists():  # one weight scale per layer, as the simplest INT8 toolchains do
        export.to_onnx_int8(float_file, per_tensor, batches, per_channel=False)
    fp32 = cmd_eval(str(run / "deployed.pt"), None, None, progress=False)
    int8 = cmd_eval(str(int8_file), None, None, progress=False)
    int8_tensor = cmd_eval(str(per_tensor), None, None, progress=False)
    w_outlier, w_spread = weight_stats(plain)
    return {
        "run": run.name,
        "recipe": cfg.recipe,
        "connectivity": cfg.connectivity,
        "stochastic": cfg.stochastic,
        "seed": cfg.seed,
        "acc_fp32": fp32["val_acc"],
        "acc_int8": int8["val_acc"],
        "drop": fp32["val_acc"] - int8["val_acc"],
        "acc_int8_per_tensor": int8_tensor["val_acc"],
        "drop_per_tensor": fp32["val_acc"] - int8_tensor["val_acc"],
        "w_outlier": w_outlier,
        "w_spread": w_spread,
        "a_outlier": activation_outlier(plain, batches),
        "float_bytes": float_file.stat().st_size,
        "int8_bytes": int8_file.stat().st_size,
    }


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    values = [v * scale for v in values]
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def tables(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        setting = "block" if row["connectivity"] == "block" else f"ns + stoch {row['stochastic']:g}"
        groups[(row["recipe"], setting)].append(row)
    lines = [
        "| recipe | connectivity | runs | deployed fp32 (%) | INT8 (%) | drop (points) "
        "| drop, per-tensor weights | w_outlier | w_spread | a_outlier |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    order = ["plain", "repvgg", "qarepvgg", "dbb", "nsnet"]
    for (recipe, setting), group in sorted(
        groups.items(), key=lambda item: (order.index(item[0][0]) if item[0][0] in order else 99, item[0])
    ):

        def column(key: str, group: list[dict] = group) -> list[float]:
            return [r[key] for r in group]

        lines.append(
            f"| {recipe} | {setting} | {len(group)} | {mean_std(column('acc_fp32'), 100)} "
            f"| {mean_std(column('acc_int8'), 100)} | {mean_std(column('drop'), 100)} "
            f"| {mean_std(column('drop_per_tensor'), 100)} "
            f"| {mean_std(column('w_outlier'), digits=1)} | {mean_std(column('w_spread'), digits=1)} "
            f"| {mean_std(column('a_outlier'), digits=1)} |"
        )
    return "\n".join(lines)


def full_width() -> dict:
    """A full-width ResNet-18 (nsnet, ns + stochastic; cifar stem, 100 classes), its BatchNorm
    statistics set by 4 training-mode batches of random images, deployed, exported to INT8
    (calibrated on 256 random images) and compared with fp32 on 256 other random images."""
    torch.manual_seed(0)
    model = neusub.create_model(
        "resnet18", recipe="nsnet", connectivity="ns", stochastic=1.0, num_classes=100
    )
    with torch.no_grad():
        model.train()
        for _ in range(4):
            model(torch.randn(32, 3, 32, 32))
    model.eval()
    with tempfile.TemporaryDirectory() as scratch:
        float_file = export.to_onnx(model, Path(scratch) / "r18.onnx", (1, 3, 32, 32))
        start = time.perf_counter()
        int8_file = export.to_onnx_int8(
            float_file, Path(scratch) / "r18.int8.onnx", torch.randn(256, 3, 32, 32).split(32)
        )
        seconds = time.perf_counter() - start
        x = torch.randn(256, 3, 32, 32)
        fp32, int8 = export.OnnxModel(float_file)(x), export.OnnxModel(int8_file)(x)
        return {
            "float_mb": float_file.stat().st_size / 2**20,
            "int8_mb": int8_file.stat().st_size / 2**20,
            "quantize_seconds": seconds,
            "logit_rel_error": float((int8 - fp32).abs().mean() / fp32.abs().mean()),
            "top1_agreement": float((int8.argmax(1) == fp32.argmax(1)).float().mean()),
            "params_deployed": sum(p.numel() for p in neusub.deploy(model).parameters()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("experiment", type=Path, help="the --out folder of neusub experiment")
    parser.add_argument("--full-width", action="store_true")
    args = parser.parse_args()
    runs = sorted(p for p in (args.experiment / "runs").iterdir() if (p / "deployed.pt").is_file())
    rows = []
    for run in runs:
        rows.append(measure_run(run))
        print(f"{run.name}: fp32 {rows[-1]['acc_fp32']:.4f} int8 {rows[-1]['acc_int8']:.4f}", file=sys.stderr)
    with open(args.experiment / "int8.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = tables(rows)
    if args.full_width:
        report += "\n\nfull-width ResNet-18: " + json.dumps(full_width(), indent=2)
    (args.experiment / "int8.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
