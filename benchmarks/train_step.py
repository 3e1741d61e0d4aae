"""Training-cost benchmark (docs/design.md §3): train-step time and peak memory of NS layers vs plain.

Every configuration runs in a fresh worker process (this script re-invoked with the
hidden ``--worker NAME`` flag), so peak RSS is that model's own, and the parent
collects one JSON line from each worker's stdout. Reported per configuration:

- median train-step time (zero_grad + forward + cross-entropy + backward + SGD step,
  after warm-up steps) and its ratio to the plain model measured in the same run;
- peak RSS of the worker (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, KiB on Linux);
- conv FLOPs of the training structure over plain (counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on every convolution actually executed
  in the first warm-up step): the forward ratio is the bound a step-time ratio is
  judged against; the forward + backward ratio is recorded too;
- deployed inference: ``neusub.deploy(resnet18 nsnet ns)`` against torchvision's
  ResNet-18 with the same CIFAR stem (3×3/1 conv1, no max-pool), eval, no grad,
  timed side by side in one process, alternating, many iterations.

Usage::

    python benchmarks/train_step.py                 # everything (≈15 min on 2 idle cores)
    python benchmarks/train_step.py --quick         # smoke run
    python benchmarks/train_step.py --only r18_conv2_ns   # one config (+ its baseline)
    python benchmarks/train_step.py --only r18_nsnet_ns --profile   # torch.profiler breakdown
    python benchmarks/train_step.py --previous REV  # also the twins ``prev_*`` from git revision REV

Sources of a configuration: ``neusub`` (``neusub.create_model``; its ResNets are timm's,
converted), ``timm`` (the plain timm model), ``convert`` (``neusub.convert`` of the timm
model) and ``previous`` (``create_model`` of an earlier git revision, unpacked to a temporary
folder and put first on the worker's ``PYTHONPATH``), so that a new path is timed against the
old one in the same run.

Results: a markdown table on stdout, and ``benchmarks/results/train_step.{json,md}``
(``train_step_<name>.{json,md}`` with ``--only``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULT_MARK = "@@TRAIN_STEP_RESULT@@ "
RESULTS_DIR = Path(__file__).resolve().parent / "results"
INFERENCE = "r18_deploy_inference"


@dataclass(frozen=True)
class Config:
    name: str
    model: str
    recipe: str
    connectivity: str
    stochastic: float = 0.0
    recompute: bool = False  # neusub.set_recompute: the memory-for-time option
    batch: int = 32
    baseline: str | None = None  # config whose time / RSS the ratios are taken over
    steps: int = 3  # default timed steps (after warm-up)
    source: str = "neusub"  # neusub | timm | convert | previous (see the module docstring)
    layers: str | None = None  # create_model's / convert's layers= policy
    twin: str | None = None  # the same configuration from the previous revision (time compared)


_PREVIOUS = [  # (name, model, recipe, connectivity, stochastic, batch, baseline)
    ("r18_nsnet_ns", "resnet18", "nsnet", "ns", 1.0, 32, "r18_plain"),
    ("r18_conv2_ns", "resnet18", "conv2", "ns", 0.0, 32, "r18_plain"),
    ("r18_conv3_ns", "resnet18", "conv3", "ns", 0.0, 32, "r18_plain"),
    ("r18_dbb_block", "resnet18", "dbb", "block", 0.0, 32, "r18_plain"),
    ("r50_nsnet_ns", "resnet50", "nsnet", "ns", 1.0, 16, "r50_plain"),
]
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        *(
            Config(f"prev_{n}", m, r, c, st, batch=b, baseline=base, source="previous")
            for n, m, r, c, st, b, base in _PREVIOUS
        ),
        Config("r18_plain", "resnet18", "plain", "block", steps=6),
        Config(
            "r18_nsnet_ns",
            "resnet18",
            "nsnet",
            "ns",
            1.0,
            baseline="r18_plain",
            steps=3,
        ),
        Config(
            "r18_nsnet_ns_recompute",
            "resnet18",
            "nsnet",
            "ns",
            1.0,
            recompute=True,
            baseline="r18_plain",
            steps=3,
        ),
        Config("r18_conv2_ns", "resnet18", "conv2", "ns", baseline="r18_plain", steps=3),
        Config("r18_conv3_ns", "resnet18", "conv3", "ns", baseline="r18_plain", steps=3),
        Config("r18_dbb_block", "resnet18", "dbb", "block", baseline="r18_plain", steps=3),
        Config("r50_plain", "resnet50", "plain", "block", batch=16, steps=5),
        Config(
            "r50_nsnet_ns",
            "resnet50",
            "nsnet",
            "ns",
            1.0,
            batch=16,
            baseline="r50_plain",
            steps=3,
        ),
        Config(
            "r50_nsnet_ns_recompute",
            "resnet50",
            "nsnet",
            "ns",
            1.0,
            recompute=True,
            batch=16,
            baseline="r50_plain",
            steps=3,
        ),
        Config(
            "r50_paper_ns",
            "resnet50",
            "nsnet",
            "ns",
            1.0,
            batch=16,
            baseline="r50_plain",
            steps=2,
            layers="paper",
        ),
        Config("effb0_timm", "efficientnet_b0", "plain", "block", steps=5, source="timm"),
        Config(
            "effb0_nsnet_ns",
            "efficientnet_b0",
            "nsnet",
            "ns",
            1.0,
            baseline="effb0_timm",
            steps=3,
            source="convert",
        ),
        Config("convnext_atto_timm", "convnext_atto", "plain", "block", steps=5, source="timm"),
        Config(
            "convnext_atto_nsnet_ns",
            "convnext_atto",
            "nsnet",
            "ns",
            1.0,
            baseline="convnext_atto_timm",
            steps=3,
            source="convert",
        ),
    ]
}
for _name, *_ in _PREVIOUS:  # each current configuration is compared with its previous twin
    CONFIGS[_name] = dataclasses.replace(CONFIGS[_name], twin=f"prev_{_name}")
NUM_CLASSES, IMAGE = 100, 32
ALL_NAMES = [*CONFIGS, INFERENCE]


# =========================================================================== worker side


def _setup(threads: int, seed: int = 0):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


def _peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _build(cfg: Config):
    import neusub

    if cfg.source in ("timm", "convert"):
        import timm

        plain = timm.create_model(cfg.model, num_classes=NUM_CLASSES)
        if cfg.source == "timm":
            return plain
        return neusub.convert(
            plain,
            recipe=cfg.recipe,
            connectivity=cfg.connectivity,
            stochastic=cfg.stochastic,
            init="fresh",
            example_input=(1, 3, IMAGE, IMAGE),
            on_merge="ignore",
        )
    extra = {"layers": cfg.layers} if cfg.layers else {}
    return neusub.create_model(
        cfg.model,
        recipe=cfg.recipe,
        connectivity=cfg.connectivity,
        stochastic=cfg.stochastic,
        num_classes=NUM_CLASSES,
        stem="cifar",
        recompute=cfg.recompute,
        **extra,
    )


def _flops_by_op(mode) -> dict[str, int]:
    return {str(op): int(n) for op, n in mode.get_flop_counts().get("Global", {}).items()}


def _conv_flops(counts: dict[str, int]) -> int:
    return sum(n for op, n in counts.items() if "convolution" in op)


def _profile_labels(enabled: bool):
    """Wrap neusub's training code paths in ``record_function`` labels (``--profile`` only)."""
    if not enabled:
        return contextlib.nullcontext()
    import torch
    from torch.profiler import record_function

    import neusub.layers as layers
    import neusub.streams as streams

    patches = []

    def wrap(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        patches.append((owner, attr, original))
        setattr(owner, attr, wrapped)

    wrap(layers, "input_moments", "neusub::input_moments")
    wrap(
        layers._RepLayer, "stacked_kernel_for_batch", "neusub::stacked_kernel_for_batch (kernel composition)"
    )
    wrap(layers._RepLayer, "_connect", "neusub::_connect (einsum mixing / sum)")
    wrap(streams.GuidedActivation, "forward_streams", "neusub::guided_activation")
    wrap(streams.StreamAdd, "forward_streams", "neusub::stream_add")
    wrap(streams.StreamMerge, "forward_streams", "neusub::stream_merge")
    wrap(torch.nn.BatchNorm2d, "forward", "neusub::batch_norm (stacked BN)")

    original_run = layers._RepLayer._run_branches

    def run_branches(self, flat, op):
        def labelled(x, w, b):
            with record_function("neusub::stacked_conv"):
                return op(x, w, b)

        return original_run(self, flat, labelled)

    patches.append((layers._RepLayer, "_run_branches", original_run))
    layers._RepLayer._run_branches = run_branches

    @contextlib.contextmanager
    def restore():
        try:
            yield
        finally:
            for owner, attr, original in reversed(patches):
                setattr(owner, attr, original)

    return restore()


def _print_profile(prof, steps: int) -> None:
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    print(f"\n=== torch.profiler: {steps} train steps, self CPU time by op (top 30) ===", file=sys.stderr)
    print(events.table(sort_by="self_cpu_time_total", row_limit=30), file=sys.stderr)
    print("=== neusub code paths (CPU time incl. children, forward only) ===", file=sys.stderr)
    for e in sorted(events, key=lambda e: -e.cpu_time_total):
        if e.key.startswith("neusub::"):
            share = 100.0 * e.cpu_time_total / total
            print(
                f"  {e.key:55s} {e.cpu_time_total / 1e6 / steps:8.3f} s/step  {share:5.1f}%  "
                f"calls/step {e.count / steps:.0f}",
                file=sys.stderr,
            )
    backward = [e for e in events if "Backward" in e.key]
    print("=== autograd backward nodes (CPU time incl. children) ===", file=sys.stderr)
    for e in sorted(backward, key=lambda e: -e.cpu_time_total)[:15]:
        share = 100.0 * e.cpu_time_total / total
        print(f"  {e.key:55s} {e.cpu_time_total / 1e6 / steps:8.3f} s/step  {share:5.1f}%", file=sys.stderr)


def run_train_worker(cfg: Config, steps: int, warmup: int, threads: int, budget: float, profile: int) -> dict:
    torch = _setup(threads)
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    load_start = os.getloadavg()
    model = _build(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(cfg.batch, 3, IMAGE, IMAGE)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch,))
    params = sum(p.numel() for p in model.parameters())

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return float(loss.detach())

    # First warm-up step, with every convolution's FLOPs counted (forward and backward apart).
    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd_mode:
        loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as bwd_mode:
        loss.backward()
    opt.step()
    fwd, bwd = _flops_by_op(fwd_mode), _flops_by_op(bwd_mode)
    for _ in range(warmup - 1):
        step()

    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with _profile_labels(True), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(profile):
                step()
        _print_profile(prof, profile)

    times, cpu_times, losses = [], [], []
    start = time.perf_counter()
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if i + 1 >= 2 and time.perf_counter() - start > budget:
            break  # over the time budget: keep the (≥ 2) steps measured so far
    return {
        "kind": "train",
        "config": asdict(cfg),
        "params": params,
        "steps": len(times),
        "warmup": warmup,
        "step_times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "step_cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "peak_rss_kib": _peak_rss_kib(),
        "fwd_flops": fwd,
        "bwd_flops": bwd,
        "fwd_conv_flops": _conv_flops(fwd),
        "train_conv_flops": _conv_flops(fwd) + _conv_flops(bwd),
        "final_loss": losses[-1],
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def _torchvision_resnet18():
    import torchvision
    from torch import nn

    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model.eval()


def _fold_bn(model):
    """torchvision ResNet with every conv-BN folded into a conv with bias (eval)."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = copy.deepcopy(model).eval()
    model.conv1, model.bn1 = fuse_conv_bn_eval(model.conv1, model.bn1), nn.Identity()
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for blk in stage:
            blk.conv1, blk.bn1 = fuse_conv_bn_eval(blk.conv1, blk.bn1), nn.Identity()
            blk.conv2, blk.bn2 = fuse_conv_bn_eval(blk.conv2, blk.bn2), nn.Identity()
            if blk.downsample is not None:
                blk.downsample = fuse_conv_bn_eval(blk.downsample[0], blk.downsample[1])
    return model


def run_inference_worker(iters: int, threads: int, warmup: int = 3) -> dict:
    torch = _setup(threads)
    import neusub

    load_start = os.getloadavg()
    trained = _build(CONFIGS["r18_nsnet_ns"]).train()
    deployed = neusub.deploy(trained)
    del trained
    models = {
        "deployed": deployed,
        "torchvision": _torchvision_resnet18(),
    }
    models["torchvision_bn_folded"] = _fold_bn(models["torchvision"])
    x = torch.randn(32, 3, IMAGE, IMAGE)
    convs = {k: sum(isinstance(mod, torch.nn.Conv2d) for mod in m.modules()) for k, m in models.items()}
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    with torch.no_grad():
        for _ in range(warmup):
            for m in models.values():
                m(x)
        for i in range(iters):
            order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
            for k in order:
                t0 = time.perf_counter()
                models[k](x)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [d / t for d, t in zip(times["deployed"], times["torchvision"])]
    paired_folded = [d / t for d, t in zip(times["deployed"], times["torchvision_bn_folded"])]
    return {
        "kind": "inference",
        "iters": iters,
        "times_s": times,
        "median_s": med,
        "ratio": med["deployed"] / med["torchvision"],
        "paired_ratio_median": statistics.median(paired),
        "ratio_vs_bn_folded": med["deployed"] / med["torchvision_bn_folded"],
        "paired_ratio_vs_bn_folded_median": statistics.median(paired_folded),
        "conv_layers": convs,
        "params": params,
        "peak_rss_kib": _peak_rss_kib(),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


def worker_main(args: argparse.Namespace) -> None:
    name = args.worker
    if name == INFERENCE:
        result = run_inference_worker(args.iters, args.threads)
    else:
        cfg = CONFIGS[name]
        steps = args.steps or cfg.steps
        result = run_train_worker(cfg, steps, args.warmup, args.threads, args.budget, args.profile)
    result["name"] = name
    result["neusub_src_sha1"] = _code_version(git=False)["neusub_src_sha1"]
    print(RESULT_MARK + json.dumps(result), flush=True)


# =========================================================================== parent side


def run_worker(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name]
    cmd += ["--threads", str(args.threads), "--warmup", str(args.warmup)]
    cmd += ["--budget", str(args.budget), "--iters", str(args.iters)]
    if args.steps:
        cmd += ["--steps", str(args.steps)]
    if args.profile and name != INFERENCE and CONFIGS[name].baseline is not None:
        cmd += ["--profile", str(args.profile)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if name in CONFIGS and CONFIGS[name].source == "previous":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.previous_src, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    print(f"[train_step] {name}: running (fresh process) ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name!r} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}")
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["wall_s"] = time.perf_counter() - t0
    print(f"[train_step] {name}: done in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def _gb(kib: int) -> float:
    return kib * 1024 / 1e9


def _base_value(r: dict, key: str) -> float:
    """A baseline's median (time or CPU time): the mean over its run and its re-run, if any."""
    runs = [r] + ([r["rerun"]] if "rerun" in r else [])
    return statistics.mean(run[key] for run in runs)


def summarize(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name, r in results.items():
        if r["kind"] != "train":
            continue
        cfg = CONFIGS[name]
        base = results.get(cfg.baseline) if cfg.baseline else None
        row = {
            "name": name,
            "model": cfg.model,
            "recipe": cfg.recipe,
            "layers": cfg.layers,
            "source": cfg.source,
            "connectivity": cfg.connectivity
            + (f" (stochastic={cfg.stochastic:g})" if cfg.stochastic else "")
            + (", recompute" if cfg.recompute else ""),
            "batch": cfg.batch,
            "steps": r["steps"],
            "median_s": _base_value(r, "median_s"),
            "runs_median_s": [r["median_s"]] + ([r["rerun"]["median_s"]] if "rerun" in r else []),
            "peak_rss_gb": _gb(r["peak_rss_kib"]),
            "median_cpu_s": _base_value(r, "median_cpu_s"),
            "fwd_conv_gflop": r["fwd_conv_flops"] / 1e9,
            "time_ratio": None,
            "cpu_time_ratio": None,
            "conv_flops_ratio": None,
            "train_conv_flops_ratio": None,
            "rss_ratio": None,
            "vs_previous": None,
        }
        if base is not None:
            row["time_ratio"] = r["median_s"] / _base_value(base, "median_s")
            row["cpu_time_ratio"] = r["median_cpu_s"] / _base_value(base, "median_cpu_s")
            row["conv_flops_ratio"] = r["fwd_conv_flops"] / base["fwd_conv_flops"]
            row["train_conv_flops_ratio"] = r["train_conv_flops"] / base["train_conv_flops"]
            row["rss_ratio"] = r["peak_rss_kib"] / base["peak_rss_kib"]
        twin = results.get(cfg.twin) if cfg.twin else None
        twin_base = results.get(CONFIGS[cfg.twin].baseline) if twin is not None else None
        if twin is not None and base is not None:  # the time ratio over the previous path's ratio
            row["vs_previous"] = row["time_ratio"] / (twin["median_s"] / _base_value(twin_base, "median_s"))
        rows.append(row)
    return rows


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows: list[dict], inference: dict | None, meta: dict) -> str:
    out = [
        f"Train step (zero_grad + forward + cross-entropy + backward + SGD), CPU, "
        f"{meta['threads']} threads, random 3×{IMAGE}×{IMAGE} data, {NUM_CLASSES} classes, "
        f"cifar stem; one fresh process per model. torch {meta['torch']}, neusub sources "
        f"{meta.get('neusub_src_sha1')} (commit {meta.get('git_commit', '?')}"
        f"{', uncommitted changes' if meta.get('src_dirty') else ''}). "
        f"Load average (1/5/15 min) before {meta['loadavg_before']}, after {meta['loadavg_after']}.",
        "",
        "| config | model | recipe | connectivity | batch | steps | median step (s) | time × plain "
        "| × previous path | CPU time × plain | conv FLOPs × plain (fwd; fwd+bwd) "
        "| peak RSS (GB) | RSS × plain |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        flops = (
            f"1 ({r['fwd_conv_gflop']:.1f} GFLOP fwd)"
            if r["conv_flops_ratio"] is None
            else f"{r['conv_flops_ratio']:.2f}; {r['train_conv_flops_ratio']:.2f}"
        )
        median = f"{r['median_s']:.2f}"
        if len(r["runs_median_s"]) > 1:
            median += " (mean of " + ", ".join(f"{t:.2f}" for t in r["runs_median_s"]) + ")"
        recipe = r["recipe"] + (f" ({r['layers']})" if r.get("layers") else "")
        out.append(
            f"| {r['name']} | {r['model']} | {recipe} "
            f"| {r['connectivity']} | {r['batch']} "
            f"| {r['steps']} | {median} | {_fmt(r['time_ratio'], '.2f', '×')} "
            f"| {_fmt(r['vs_previous'], '.3f')} | {_fmt(r['cpu_time_ratio'], '.2f', '×')} | {flops} "
            f"| {r['peak_rss_gb']:.2f} | {_fmt(r['rss_ratio'], '.2f', '×')} |"
        )
    if inference is not None:
        med = inference["median_s"]
        # The plain backbone a deployed network is compared with is torchvision's with its BN
        # folded into the convs (same layers and parameters); stock torchvision also runs 20 BNs.
        out += [
            "",
            f"Deployed inference (eval, no grad, batch 32, {inference['iters']} alternating iterations, "
            "one process): `neusub.deploy(resnet18 nsnet ns)` vs torchvision ResNet-18 "
            "(conv1 3×3/1, maxpool Identity).",
            "",
            "| model | median forward (ms) | conv layers | params | deployed × this (ratio of medians; "
            "median of paired ratios) |",
            "|---|--:|--:|--:|--:|",
        ]
        for key, label in [
            ("deployed", "neusub deployed"),
            ("torchvision", "torchvision"),
            ("torchvision_bn_folded", "torchvision, BN folded"),
        ]:
            if key == "deployed":
                ratio = "—"
            elif key == "torchvision":
                ratio = f"{inference['ratio']:.3f}; {inference['paired_ratio_median']:.3f} (runs its BNs)"
            else:
                ratio = (
                    f"{inference['ratio_vs_bn_folded']:.3f}; "
                    f"{inference['paired_ratio_vs_bn_folded_median']:.3f}"
                )
            out.append(
                f"| {label} | {med[key] * 1e3:.1f} | {inference['conv_layers'][key]} "
                f"| {inference['params'][key]:,} | {ratio} |"
            )
    versions = meta.get("worker_src_sha1", {})
    if len(set(versions.values())) > 1:
        out += [
            "",
            "**Warning: the neusub sources changed during this run** (worker → source hash): "
            + ", ".join(f"{k} {v}" for k, v in versions.items()),
        ]
    out += [
        "",
        "Ratios are to the plain model of the same depth measured in the same run. Conv FLOPs count "
        "every convolution executed in a training step (FlopCounterMode): the forward ratio is the "
        "bound a time ratio is judged against. A baseline run again after its dependents "
        "(--no-bracket to skip) enters the ratios as the mean of its runs. The CPU-time ratio "
        "(process CPU seconds per step) is less disturbed by other load on the machine than the "
        "wall-time ratio. "
        "Peak RSS is the worker's ru_maxrss; GB = 10⁹ bytes.",
    ]
    return "\n".join(out)


def _code_version(git: bool = True) -> dict:
    """Git commit, whether src/ has uncommitted changes, and a hash of the neusub sources."""
    import hashlib

    import neusub

    root = Path(neusub.__file__).resolve().parent
    digest = hashlib.sha1()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    info = {"neusub_src_sha1": digest.hexdigest()[:12]}
    if not git:
        return info
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "-C", str(root)]
        info["git_commit"] = subprocess.run(
            [*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "."], capture_output=True, text=True)
        info["src_dirty"] = bool(status.stdout.strip())
    return info


def _unpack_previous(rev: str) -> str:
    """The ``src`` folder of git revision ``rev``, unpacked into a temporary folder."""
    import tempfile

    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="neusub-previous-"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder / "src")


def parent_main(args: argparse.Namespace) -> None:
    import torch

    if args.only:
        names: list[str] = []
        for name in args.only:
            base = CONFIGS[name].baseline if name in CONFIGS else None
            for n in (base, name):
                if n is not None and n not in names:
                    names.append(n)
        stem = "train_step_" + "_".join(args.only)
    else:
        names, stem = list(ALL_NAMES), "train_step"
    args.previous_src = _unpack_previous(args.previous) if args.previous else None
    if not args.previous:  # no earlier revision named: no twins
        names = [n for n in names if not (n in CONFIGS and CONFIGS[n].source == "previous")]
    if args.quick:
        args.steps, args.iters = args.steps or 2, min(args.iters, 6)
    meta = {
        "threads": args.threads,
        "warmup": args.warmup,
        "steps_override": args.steps,
        "budget_s": args.budget,
        "torch": torch.__version__,
        "previous": args.previous,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(v, 2) for v in os.getloadavg()],
        **_code_version(),
    }
    schedule = list(names)
    if args.bracket:  # re-run each baseline after its last dependent: ratios use the mean of both runs
        for base in [n for n in names if n in CONFIGS and CONFIGS[n].baseline is None]:
            deps = [i for i, n in enumerate(schedule) if n in CONFIGS and CONFIGS[n].baseline == base]
            if deps:
                schedule.insert(deps[-1] + 1, base)
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for name in schedule:
        result = run_worker(name, args)
        if name in results:
            results[name]["rerun"] = result
        else:
            results[name] = result
    meta["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    meta["worker_src_sha1"] = {  # the previous revision's twins run other sources on purpose
        name + suffix: run.get("neusub_src_sha1")
        for name, r in results.items()
        if not (name in CONFIGS and CONFIGS[name].source == "previous")
        for suffix, run in [("", r)] + ([(" (rerun)", r["rerun"])] if "rerun" in r else [])
    }
    meta["wall_s"] = time.perf_counter() - t0
    rows = summarize(results)
    text = markdown(rows, results.get(INFERENCE), meta)
    print(text)
    out = Path(args.out) if args.out else RESULTS_DIR / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows, "workers": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    print(
        f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({meta['wall_s']:.0f} s)",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--only",
        action="append",
        choices=ALL_NAMES,
        metavar="NAME",
        help=f"run only this configuration (repeatable; its baseline runs too): {', '.join(ALL_NAMES)}",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="timed train steps per configuration (default: per config, 3-6)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up steps (>= 1; default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--iters", type=int, default=60, help="deployed-inference iterations per model (default 60)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=300.0,
        help="stop a config's timed steps (keeping >= 2) once they took this many seconds",
    )
    p.add_argument(
        "--no-bracket",
        dest="bracket",
        action="store_false",
        help="do not re-run each baseline after its dependents (by default ratios use the mean of both runs)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps, 6 inference iterations")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="STEPS",
        help="also run torch.profiler for STEPS steps in each non-baseline worker (stderr)",
    )
    p.add_argument("--out", default=None, help="output path without suffix (default benchmarks/results/...)")
    p.add_argument(
        "--previous",
        default=None,
        metavar="REV",
        help="also time the prev_* twins with neusub from this git revision",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first warm-up step counts the FLOPs)")
    if args.worker:
        worker_main(args)
    else:
        parent_main(args)


if __name__ == "__main__":
    main()
