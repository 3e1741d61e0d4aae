"""Deployed inference: is a deployed neusub network as fast as the plain backbone?

For ResNet-18, ResNet-50, MobileOne-S0 and MobileNetV1 (full size, ImageNet stem, 224² input,
1000 classes, default recipe, ns connectivity with stochastic substitution, BatchNorm
statistics randomised), fp32 on the CPU, eval mode, ``torch.inference_mode``:

- ``neusub.deploy(model)``: the model's own class with conv + BatchNorm (the default);
- ``neusub.deploy(model, fold_norms=True)``: the BatchNorms folded into the convs;
- the plain network with its BatchNorms folded, by code that is not neusub's:
  torchvision's ResNet folded by ``torch.fx.experimental.optimization.fuse``; timm's
  ``mobilenetv1_100`` (ReLU, as neusub's) folded pair by pair with
  ``torch.nn.utils.fusion.fuse_conv_bn_eval``; timm's ``mobileone_s0`` after timm's own
  ``reparameterize_model``.

Each batch size times the three networks of a model in one process, alternating (one forward
of each per round, the order rotating), after warm-up; reported: the median forward time of
each and the median of the per-round ratios to the plain folded network (the steadier
figure on a shared machine). Goal: folded ≤ 1.02× plain folded.

Usage::

    python benchmarks/deploy.py                # everything (≈ 10 min on 2 busy cores)
    python benchmarks/deploy.py --quick        # smoke run (few rounds)
    python benchmarks/deploy.py --models resnet18 --batches 1

Results: a markdown table on stdout and in ``benchmarks/results/deploy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import harness
import timm
import torch
import torchvision
from torch import nn
from torch.fx.experimental.optimization import fuse
from torch.nn.utils.fusion import fuse_conv_bn_eval

import neusub

MODELS = ("resnet18", "resnet50", "mobileone_s0", "mobilenet_v1")
VARIANTS = ("plain_folded", "deployed", "folded")
ROUNDS = {1: 60, 32: 15}  # timed rounds per batch size (warm-up: 3 rounds)


def randomize_bn(model: nn.Module) -> None:
    """BatchNorm statistics away from their initial values (a folded BN is then not a no-op)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def timm_mobilenet_v1_folded() -> nn.Module:
    """timm's MobileNetV1 (ReLU) with each conv-BN pair folded by torch's own fuse_conv_bn_eval."""
    model = timm.create_model("mobilenetv1_100", act_layer="relu").eval()
    randomize_bn(model)
    pairs = [(model, "conv_stem", "bn1")]
    pairs += [(block, "conv_dw", "bn1") for stage in model.blocks for block in stage]
    pairs += [(block, "conv_pw", "bn2") for stage in model.blocks for block in stage]
    for owner, conv, norm in pairs:
        bn = getattr(owner, norm)  # timm's BatchNormAct2d: a BatchNorm2d, then drop and act
        plain_bn = nn.BatchNorm2d(bn.num_features, bn.eps).eval()
        plain_bn.load_state_dict(bn.state_dict())
        setattr(owner, conv, fuse_conv_bn_eval(getattr(owner, conv), plain_bn))
        setattr(owner, norm, nn.Sequential(bn.drop, bn.act))
    return model


def plain_folded(name: str) -> nn.Module:
    """The plain backbone with its BatchNorms folded by code that is not neusub's."""
    if name.startswith("resnet"):
        model = getattr(torchvision.models, name)().eval()
        randomize_bn(model)
        return fuse(model)
    if name == "mobileone_s0":
        model = timm.create_model("mobileone_s0").eval()
        randomize_bn(model)
        return timm.utils.reparameterize_model(model)
    return timm_mobilenet_v1_folded()


def networks(name: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    model = neusub.create_model(name)  # default recipe, ns + stochastic, 224² ImageNet stem
    randomize_bn(model)
    model.eval()
    return {
        "plain_folded": plain_folded(name),
        "deployed": neusub.deploy(model),
        "folded": neusub.deploy(model, fold_norms=True),
    }


def count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def alternate(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """Wall seconds of ``rounds`` calls of each, one call of each per round, order rotating."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            wall, _ = harness.timed(fns[n])
            if r >= warmup:
                times[n].append(wall)
    return times


def measure(name: str, batches: list[int], rounds: dict[int, int]) -> dict:
    nets = networks(name)
    result = {
        "model": name,
        "params": {v: sum(p.numel() for p in m.parameters()) for v, m in nets.items()},
        "convs": {v: count(m, nn.Conv2d) for v, m in nets.items()},
        "batchnorms": {v: count(m, nn.modules.batchnorm._BatchNorm) for v, m in nets.items()},
        "batches": {},
    }
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224)
        with torch.inference_mode():
            reference = nets["deployed"](x)
            scale = reference.abs().max()
            errors = {v: float((m(x) - reference).abs().max() / scale) for v, m in nets.items()}
            times = alternate({v: (lambda m=m, x=x: m(x)) for v, m in nets.items()}, rounds[batch])
        median = {v: statistics.median(t) for v, t in times.items()}
        paired = {
            v: statistics.median(a / b for a, b in zip(times[v], times["plain_folded"])) for v in VARIANTS
        }
        result["batches"][str(batch)] = {
            "rounds": rounds[batch],
            "median_ms": {v: 1e3 * t for v, t in median.items()},
            "paired_ratio_to_plain_folded": paired,
            "ratio_of_medians": {v: median[v] / median["plain_folded"] for v in VARIANTS},
            "ratio_of_minimums": {v: min(times[v]) / min(times["plain_folded"]) for v in VARIANTS},
            "relative_error_to_deployed": errors,
            "times_ms": {v: [round(1e3 * t, 3) for t in ts] for v, ts in times.items()},
        }
        print(
            f"{name} b{batch}: "
            + ", ".join(f"{v} {1e3 * median[v]:.1f} ms ({paired[v]:.3f}×)" for v in VARIANTS),
            flush=True,
        )
    return result


def markdown(results: list[dict], meta: dict) -> str:
    rows = []
    for r in results:
        for batch, b in r["batches"].items():
            ms, paired, fastest = b["median_ms"], b["paired_ratio_to_plain_folded"], b["ratio_of_minimums"]
            rows.append(
                [
                    r["model"],
                    batch,
                    f"{ms['plain_folded']:.1f}",
                    f"{ms['deployed']:.1f}",
                    f"**{paired['deployed']:.3f}×**",
                    f"{ms['folded']:.1f}",
                    f"**{paired['folded']:.3f}×** ({fastest['folded']:.3f}×)",
                    f"{r['batchnorms']['deployed']} → {r['batchnorms']['folded']}",
                ]
            )
    header = [
        "model",
        "batch",
        "plain, BN folded (ms)",
        "deployed (ms)",
        "deployed × plain folded",
        "deployed, fold_norms (ms)",
        "fold_norms × plain folded (fastest rounds)",
        "BatchNorms",
    ]
    lines = [
        f"Deployed inference, fp32, CPU ({meta['threads']} threads), eval, inference_mode, 224² input; "
        f"median forward time, median of per-round ratios (rounds alternate the three networks) and, in "
        f"parentheses, the ratio of the fastest rounds. "
        f"torch {meta['machine']['torch']}, neusub sources {meta['code']['neusub_src_sha1']}. "
        f"Load average before {meta['load_before']}, after {meta['load_after']}.",
        "",
        *harness.markdown_table(header, "lrrrrrrr", rows),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="3 rounds per batch size: a smoke run")
    parser.add_argument("--out", default=str(harness.RESULTS_DIR / "deploy"), help="results path stem")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = {b: 3 if args.quick else ROUNDS.get(b, 8) for b in args.batches}
    meta = {
        "threads": args.threads,
        "machine": harness.machine(),
        "code": harness.code_version(),
        "load_before": harness.load_average(),
    }
    results = [measure(name, args.batches, rounds) for name in args.models]
    meta["load_after"] = harness.load_average()
    text = markdown(results, meta)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
