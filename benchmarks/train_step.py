"""Training-cost benchmark (docs/design.md §3): train-step time and peak memory of NS layers vs plain.

Every configuration runs in a fresh worker process (:func:`harness.run_worker`), so peak
RSS is that model's own. Reported per configuration:

- median train-step time (zero_grad + forward + cross-entropy + backward + SGD step,
  after warm-up steps) and its ratio to the plain model measured in the same run;
- peak RSS of the worker, and its growth over the built model during the steps
  (:func:`harness.peak_memory`, as in ``layer.py``);
- conv FLOPs of the training structure over plain (counted with
  ``torch.utils.flop_counter.FlopCounterMode`` on every convolution actually executed
  in the first warm-up step): the forward ratio is the bound a step-time ratio is
  judged against; the forward + backward ratio is recorded too;
- deployed inference: ``neusub.deploy(resnet18 nsnet ns)`` against torchvision's
  ResNet-18 with the same CIFAR stem (3×3/1 conv1, no max-pool), eval, no grad,
  timed side by side in one process, alternating, many iterations;
- compiled rows (``*_compiled``: ``torch.compile(model)``, inductor, default settings): step time
  and peak RSS against the eager twin, the first step's time (the compilation) and the number
  of graphs Dynamo made;
- graph breaks (``graph_breaks``): ``torch._dynamo.explain`` of a training forward of every
  model family, neusub's own and converted torchvision / timm ones: graphs, breaks, first reason.

Usage::

    python benchmarks/train_step.py                 # everything (≈15 min on 2 idle cores)
    python benchmarks/train_step.py --quick         # smoke run
    python benchmarks/train_step.py --only r18_conv2_ns   # one config (+ its baseline)
    python benchmarks/train_step.py --only r18_nsnet_ns --profile 2   # torch.profiler, 2 steps
    python benchmarks/train_step.py --previous REV  # also the twins ``prev_*`` from git revision REV

Sources of a configuration: ``neusub`` (``neusub.create_model``; its ResNets are timm's,
converted), ``timm`` (the plain timm model), ``convert`` (``neusub.convert`` of the timm
model) and ``previous`` (``create_model`` of an earlier git revision, unpacked to a temporary
folder and put first on the worker's ``PYTHONPATH``), so that a new path is timed against the
old one in the same run.

Results: a markdown table on stdout, and ``runs/benchmarks/train_step.{json,md}``
(``train_step_<name>.{json,md}`` with ``--only``); ``--out benchmarks/results/train_step``
updates the recorded results.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import harness

INFERENCE = "r18_deploy_inference"
GRAPHS = "graph_breaks"


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
    compiled: bool = False  # torch.compile(model), default settings (inductor)
    eager: str | None = None  # a compiled configuration's eager twin (time and memory compared)


_PREVIOUS = [  # (name, model, recipe, connectivity, stochastic, batch, baseline)
    ("r18_nsnet_ns", "resnet18", "nsnet", "ns", 1.0, 32, "r18_plain"),
    ("r18_conv2_ns", "resnet18", "conv2", "ns", 0.0, 32, "r18_plain"),
    ("r18_conv3_ns", "resnet18", "conv3", "ns", 0.0, 32, "r18_plain"),
    ("r18_dbb_block", "resnet18", "dbb", "block", 0.0, 32, "r18_plain"),
    ("r50_nsnet_ns", "resnet50", "nsnet", "ns", 1.0, 16, "r50_plain"),
]
R18, R50 = {"baseline": "r18_plain"}, {"baseline": "r50_plain", "batch": 16}  # per depth: baseline, batch
CONFIGS: dict[str, Config] = {
    c.name: c
    for c in [
        *(
            Config(f"prev_{n}", m, r, c, st, batch=b, baseline=base, source="previous")
            for n, m, r, c, st, b, base in _PREVIOUS
        ),
        Config("r18_plain", "resnet18", "plain", "block", steps=6),
        Config("r18_nsnet_ns", "resnet18", "nsnet", "ns", 1.0, **R18),
        Config("r18_nsnet_ns_recompute", "resnet18", "nsnet", "ns", 1.0, recompute=True, **R18),
        Config("r18_conv2_ns", "resnet18", "conv2", "ns", **R18),
        Config("r18_conv3_ns", "resnet18", "conv3", "ns", **R18),
        Config("r18_dbb_block", "resnet18", "dbb", "block", **R18),
        *(
            Config(f"{name}_compiled", "resnet18", recipe, conn, st, compiled=True, eager=name, **base)
            for name, recipe, conn, st, base in (
                ("r18_plain", "plain", "block", 0.0, {"steps": 6}),
                ("r18_dbb_block", "dbb", "block", 0.0, R18),
                ("r18_conv2_ns", "conv2", "ns", 0.0, R18),
                ("r18_nsnet_ns", "nsnet", "ns", 1.0, R18),
            )
        ),
        Config("r50_plain", "resnet50", "plain", "block", batch=16, steps=5),
        Config("r50_nsnet_ns", "resnet50", "nsnet", "ns", 1.0, **R50),
        Config("r50_nsnet_ns_recompute", "resnet50", "nsnet", "ns", 1.0, recompute=True, **R50),
        Config("r50_paper_ns", "resnet50", "nsnet", "ns", 1.0, steps=2, layers="paper", **R50),
        Config("effb0_timm", "efficientnet_b0", "plain", "block", steps=5, source="timm"),
        Config(
            "effb0_nsnet_ns", "efficientnet_b0", "nsnet", "ns", 1.0, baseline="effb0_timm", source="convert"
        ),
        Config("convnext_atto_timm", "convnext_atto", "plain", "block", steps=5, source="timm"),
        Config(
            "convnext_atto_nsnet_ns",
            "convnext_atto",
            "nsnet",
            "ns",
            1.0,
            baseline="convnext_atto_timm",
            source="convert",
        ),
    ]
}
for _name, *_ in _PREVIOUS:  # each current configuration is compared with its previous twin
    CONFIGS[_name] = dataclasses.replace(CONFIGS[_name], twin=f"prev_{_name}")
NUM_CLASSES, IMAGE = 100, 32
ALL_NAMES = [*CONFIGS, INFERENCE, GRAPHS]


# =========================================================================== worker side


def _setup(threads: int, seed: int = 0):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return torch


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


@contextlib.contextmanager
def _module_labels(model):
    """Label each neusub module's forward (and BatchNorm's) in the profile, with forward hooks.

    Where the time goes *inside* one NS layer (moments, kernel composition, stacked conv,
    partition einsum) is ``layer.py --profile``'s breakdown."""
    import torch
    from torch.profiler import record_function

    open_ranges: list = []

    def enter(module, _inputs):
        label = record_function(f"neusub::{type(module).__name__}")
        label.__enter__()
        open_ranges.append(label)

    def leave(_module, _inputs, _output):
        open_ranges.pop().__exit__(None, None, None)

    hooks = []
    for module in model.modules():
        if type(module).__module__.startswith("neusub") or isinstance(module, torch.nn.BatchNorm2d):
            hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


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


def _counted_step(model, opt, x, y) -> tuple[dict[str, int], dict[str, int]]:
    """One train step with every operation's FLOPs counted: (forward, backward) by op."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    opt.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as fwd_mode:
        loss = F.cross_entropy(model(x), y)
    with FlopCounterMode(display=False) as bwd_mode:
        loss.backward()
    opt.step()
    return _flops_by_op(fwd_mode), _flops_by_op(bwd_mode)


def _timed_steps(step, steps: int, budget: float) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of up to ``steps`` calls; stops (keeping ≥ 2) once over ``budget``."""
    samples: list[tuple[float, float]] = []
    start = time.perf_counter()
    while len(samples) < steps:
        samples.append(harness.timed(step))
        if len(samples) >= 2 and time.perf_counter() - start > budget:
            break
    return samples


def run_train_worker(cfg: Config, steps: int, warmup: int, threads: int, budget: float, profile: int) -> dict:
    torch = _setup(threads)
    import torch.nn.functional as F

    load_start = harness.load_average()
    model = _build(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    if cfg.compiled:
        model = torch.compile(model)
    x = torch.randn(cfg.batch, 3, IMAGE, IMAGE)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch,))
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    compile_s = None
    with harness.peak_memory() as memory:
        if cfg.compiled:  # the first step compiles; FLOPs are the eager twin's
            compile_s, _ = harness.timed(step)
            fwd, bwd = {}, {}
        else:
            fwd, bwd = _counted_step(model, opt, x, y)  # the first warm-up step
        for _ in range(warmup - 1 + cfg.compiled):  # compiled: one more, for a recompilation
            step()
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            with _module_labels(model), torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(profile):
                    step()
            _print_profile(prof, profile)
        samples = _timed_steps(step, steps, budget)
    times, cpu_times = [wall for wall, _ in samples], [cpu for _, cpu in samples]
    return {
        "kind": "train",
        "config": asdict(cfg),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": len(times),
        "warmup": warmup,
        "step_times_s": times,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "step_cpu_times_s": cpu_times,
        "median_cpu_s": statistics.median(cpu_times),
        "memory": memory,
        "fwd_flops": fwd,
        "bwd_flops": bwd,
        "fwd_conv_flops": _conv_flops(fwd),
        "train_conv_flops": _conv_flops(fwd) + _conv_flops(bwd),
        "final_loss": losses[-1],
        "compile_s": compile_s,
        "graphs": _graph_count() if cfg.compiled else None,
        "loadavg_start": load_start,
        "loadavg_end": harness.load_average(),
    }


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


# model families whose training forward ``graph_breaks`` traces: (name, builder, input size)
def _graph_models():
    import timm
    import torchvision

    import neusub

    def converted(model):
        return neusub.convert(model, recipe="nsnet", example_input=(1, 3, IMAGE, IMAGE), on_merge="ignore")

    def created(name, **kwargs):
        return neusub.create_model(name, num_classes=NUM_CLASSES, **kwargs)

    return [
        ("neusub resnet18 (timm's, converted)", lambda: created("resnet18", stem="cifar")),
        ("neusub resnet50", lambda: created("resnet50", stem="cifar")),
        ("neusub mobileone_s0", lambda: created("mobileone_s0")),
        ("neusub mobilenet_v1", lambda: created("mobilenet_v1")),
        ("torchvision resnet18, converted", lambda: converted(torchvision.models.resnet18())),
        ("torchvision mobilenet_v2, converted", lambda: converted(torchvision.models.mobilenet_v2())),
        ("timm efficientnet_b0, converted", lambda: converted(timm.create_model("efficientnet_b0"))),
        ("timm convnext_atto, converted", lambda: converted(timm.create_model("convnext_atto"))),
    ]


def run_graphs_worker(threads: int) -> dict:
    """``torch._dynamo.explain`` of one training forward of each model family."""
    torch = _setup(threads)
    rows = []
    for name, build in _graph_models():
        torch._dynamo.reset()
        explained = torch._dynamo.explain(build().train())(torch.randn(2, 3, IMAGE, IMAGE))
        reasons = [r.reason.splitlines()[0][:120] for r in explained.break_reasons]
        rows.append(
            {
                "model": name,
                "graphs": explained.graph_count,
                "breaks": explained.graph_break_count,
                "first_reason": reasons[0] if reasons else None,
            }
        )
    return {"kind": "graphs", "rows": rows}


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

    load_start = harness.load_average()
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
    with torch.no_grad(), harness.peak_memory() as memory:
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
        "memory": memory,
        "loadavg_start": load_start,
        "loadavg_end": harness.load_average(),
    }


def worker_main(args: argparse.Namespace) -> None:
    name = args.worker
    if name == INFERENCE:
        result = run_inference_worker(args.iters, args.threads)
    elif name == GRAPHS:
        result = run_graphs_worker(args.threads)
    else:
        cfg = CONFIGS[name]
        steps = args.steps or cfg.steps
        result = run_train_worker(cfg, steps, args.warmup, args.threads, args.budget, args.profile)
    result["name"] = name
    result["neusub_src_sha1"] = harness.code_version(git=False)["neusub_src_sha1"]
    harness.report(result)


# =========================================================================== parent side


def run_worker(name: str, args: argparse.Namespace) -> dict:
    flags = [f"--threads={args.threads}", f"--warmup={args.warmup}"]
    flags += [f"--budget={args.budget}", f"--iters={args.iters}"]
    if args.steps:
        flags.append(f"--steps={args.steps}")
    if args.profile and name in CONFIGS and CONFIGS[name].baseline is not None:
        flags.append(f"--profile={args.profile}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if name in CONFIGS and CONFIGS[name].source == "previous":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.previous_src, env.get("PYTHONPATH")]))
    t0 = time.perf_counter()
    print(f"[train_step] {name}: running (fresh process) ...", file=sys.stderr, flush=True)
    result = harness.run_worker(__file__, name, flags, env)
    result["wall_s"] = time.perf_counter() - t0
    print(f"[train_step] {name}: done in {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


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
            "peak_rss_gb": r["memory"]["peak_mib"] * 2**20 / 1e9,
            "steps_rss_growth_gb": r["memory"]["growth_mib"] * 2**20 / 1e9,
            "median_cpu_s": _base_value(r, "median_cpu_s"),
            "fwd_conv_gflop": r["fwd_conv_flops"] / 1e9,
            "time_ratio": None,
            "cpu_time_ratio": None,
            "conv_flops_ratio": None,
            "train_conv_flops_ratio": None,
            "rss_ratio": None,
            "vs_previous": None,
        }
        eager = results.get(cfg.eager) if cfg.eager else None
        flops = eager if eager is not None else r  # a compiled step runs the eager step's convs
        if base is not None:
            row["time_ratio"] = r["median_s"] / _base_value(base, "median_s")
            row["cpu_time_ratio"] = r["median_cpu_s"] / _base_value(base, "median_cpu_s")
            row["conv_flops_ratio"] = flops["fwd_conv_flops"] / base["fwd_conv_flops"]
            row["train_conv_flops_ratio"] = flops["train_conv_flops"] / base["train_conv_flops"]
            row["rss_ratio"] = r["memory"]["peak_mib"] / base["memory"]["peak_mib"]
        if eager is not None:
            row["eager"] = cfg.eager
            row["eager_median_s"] = _base_value(eager, "median_s")
            row["vs_eager"] = r["median_s"] / row["eager_median_s"]
            row["eager_peak_rss_gb"] = eager["memory"]["peak_mib"] * 2**20 / 1e9
            row["compile_s"], row["graphs"] = r["compile_s"], r["graphs"]
        twin = results.get(cfg.twin) if cfg.twin else None
        twin_base = results.get(CONFIGS[cfg.twin].baseline) if twin is not None else None
        if twin is not None and base is not None:  # the time ratio over the previous path's ratio
            row["vs_previous"] = row["time_ratio"] / (twin["median_s"] / _base_value(twin_base, "median_s"))
        rows.append(row)
    return rows


def _compiled_lines(rows: list[dict]) -> list[str]:
    compiled = [r for r in rows if "vs_eager" in r]
    if not compiled:
        return []
    columns = ["config", "eager step (s)", "compiled step (s)", "compiled × eager", "first step (s)"]
    columns += ["graphs", "peak RSS eager → compiled (GB)"]
    cells = [
        [
            r["name"],
            f"{r['eager_median_s']:.2f}",
            f"{r['median_s']:.2f}",
            f"{r['vs_eager']:.2f}×",
            f"{r['compile_s']:.0f}",
            str(r["graphs"]),
            f"{r['eager_peak_rss_gb']:.2f} → {r['peak_rss_gb']:.2f}",
        ]
        for r in compiled
    ]
    return [
        "",
        "torch.compile (inductor, default settings) against the eager twin, each in its own process: "
        "the first step compiles (its time is the compilation and one step); graphs: how many Dynamo "
        "made (1: a full graph). A compiled process's peak RSS includes the compiler's own memory.",
        "",
        *harness.markdown_table(columns, "lrrrrrr", cells),
    ]


def _graph_lines(graphs: dict) -> list[str]:
    cells = [
        [g["model"], str(g["graphs"]), str(g["breaks"]), g["first_reason"] or "—"] for g in graphs["rows"]
    ]
    return [
        "",
        "Graph breaks of one training forward (`torch._dynamo.explain`, batch 2, "
        f"3×{IMAGE}×{IMAGE}; converted models: recipe nsnet, ns, stochastic):",
        "",
        *harness.markdown_table(["model", "graphs", "graph breaks", "first reason"], "lrrl", cells),
    ]


def _train_cells(r: dict) -> list[str]:
    flops = (
        f"1 ({r['fwd_conv_gflop']:.1f} GFLOP fwd)"
        if r["conv_flops_ratio"] is None
        else f"{r['conv_flops_ratio']:.2f}; {r['train_conv_flops_ratio']:.2f}"
    )
    median = f"{r['median_s']:.2f}"
    if len(r["runs_median_s"]) > 1:
        median += " (mean of " + ", ".join(f"{t:.2f}" for t in r["runs_median_s"]) + ")"
    recipe = r["recipe"] + (f" ({r['layers']})" if r.get("layers") else "")
    return [
        r["name"],
        r["model"],
        recipe,
        r["connectivity"],
        str(r["batch"]),
        str(r["steps"]),
        median,
        harness.fmt(r["time_ratio"], ".2f", "×"),
        harness.fmt(r["vs_previous"], ".3f"),
        harness.fmt(r["cpu_time_ratio"], ".2f", "×"),
        flops,
        f"{r['peak_rss_gb']:.2f}",
        harness.fmt(r["rss_ratio"], ".2f", "×"),
    ]


def _inference_lines(inference: dict) -> list[str]:
    # The plain backbone a deployed network is compared with is torchvision's with its BN
    # folded into the convs (same layers and parameters); stock torchvision also runs 20 BNs.
    med = inference["median_s"]
    ratios = {
        "deployed": "—",
        "torchvision": f"{inference['ratio']:.3f}; {inference['paired_ratio_median']:.3f} (runs its BNs)",
        "torchvision_bn_folded": (
            f"{inference['ratio_vs_bn_folded']:.3f}; {inference['paired_ratio_vs_bn_folded_median']:.3f}"
        ),
    }
    labels = {
        "deployed": "neusub deployed",
        "torchvision": "torchvision",
        "torchvision_bn_folded": "torchvision, BN folded",
    }
    cells = [
        [
            label,
            f"{med[key] * 1e3:.1f}",
            str(inference["conv_layers"][key]),
            f"{inference['params'][key]:,}",
            ratios[key],
        ]
        for key, label in labels.items()
    ]
    columns = ["model", "median forward (ms)", "conv layers", "params"]
    columns.append("deployed × this (ratio of medians; median of paired ratios)")
    return [
        "",
        f"Deployed inference (eval, no grad, batch 32, {inference['iters']} alternating iterations, "
        "one process): `neusub.deploy(resnet18 nsnet ns)` vs torchvision ResNet-18 "
        "(conv1 3×3/1, maxpool Identity).",
        "",
        *harness.markdown_table(columns, "lrrrr", cells),
    ]


def markdown(rows: list[dict], inference: dict | None, graphs: dict | None, meta: dict) -> str:
    columns = ["config", "model", "recipe", "connectivity", "batch", "steps", "median step (s)"]
    columns += ["time × plain", "× previous path", "CPU time × plain", "conv FLOPs × plain (fwd; fwd+bwd)"]
    columns += ["peak RSS (GB)", "RSS × plain"]
    out = [
        f"Train step (zero_grad + forward + cross-entropy + backward + SGD), CPU, "
        f"{meta['threads']} threads, random 3×{IMAGE}×{IMAGE} data, {NUM_CLASSES} classes, "
        f"cifar stem; one fresh process per model. torch {meta['torch']}, neusub sources "
        f"{meta.get('neusub_src_sha1')} (commit {meta.get('git_commit', '?')}"
        f"{', uncommitted changes' if meta.get('src_dirty') else ''}). "
        f"Load average (1/5/15 min) before {meta['loadavg_before']}, after {meta['loadavg_after']}.",
    ]
    train_rows = [_train_cells(r) for r in rows]
    out += ["", *harness.markdown_table(columns, "llll" + "r" * 9, train_rows)] if train_rows else []
    out += _compiled_lines(rows)
    if graphs is not None:
        out += _graph_lines(graphs)
    if inference is not None:
        out += _inference_lines(inference)
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
        "Peak RSS is the worker's lifetime peak (ru_maxrss); GB = 10⁹ bytes.",
    ]
    return "\n".join(out)


def _unpack_previous(rev: str) -> str:
    """The ``src`` folder of git revision ``rev``, unpacked into a temporary folder."""
    import tempfile

    root = Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="neusub-previous-"))
    archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return str(folder / "src")


def schedule(args: argparse.Namespace) -> list[str]:
    """The workers to run, in order: the chosen configurations with their baselines (and, with
    ``bracket``, each baseline again after its last dependent: ratios use the mean of both)."""
    names = list(ALL_NAMES) if not args.only else []
    for name in args.only or []:
        cfg = CONFIGS.get(name)
        before = (cfg.baseline, cfg.eager) if cfg is not None else ()
        names += [n for n in (*before, name) if n is not None and n not in names]
    if not args.previous:  # no earlier revision named: no twins
        names = [n for n in names if not (n in CONFIGS and CONFIGS[n].source == "previous")]
    order = list(names)
    if args.bracket:
        for base in [n for n in names if n in CONFIGS and CONFIGS[n].baseline is None]:
            deps = [i for i, n in enumerate(order) if n in CONFIGS and CONFIGS[n].baseline == base]
            if deps:
                order.insert(deps[-1] + 1, base)
    return order


def parent_main(args: argparse.Namespace) -> None:
    args.previous_src = _unpack_previous(args.previous) if args.previous else None
    if args.quick:
        args.steps, args.iters = args.steps or 2, min(args.iters, 6)
    meta = {
        "threads": args.threads,
        "warmup": args.warmup,
        "steps_override": args.steps,
        "budget_s": args.budget,
        "previous": args.previous,
        **harness.machine(),
        "loadavg_before": harness.load_average(),
        **harness.code_version(),
    }
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for name in schedule(args):
        result = run_worker(name, args)
        if name in results:
            results[name]["rerun"] = result
        else:
            results[name] = result
    meta["loadavg_after"] = harness.load_average()
    meta["worker_src_sha1"] = {  # the previous revision's twins run other sources on purpose
        name + suffix: run.get("neusub_src_sha1")
        for name, r in results.items()
        if not (name in CONFIGS and CONFIGS[name].source == "previous")
        for suffix, run in [("", r)] + ([(" (rerun)", r["rerun"])] if "rerun" in r else [])
    }
    meta["wall_s"] = time.perf_counter() - t0
    rows = summarize(results)
    text = markdown(rows, results.get(INFERENCE), results.get(GRAPHS), meta)
    print(text)
    stem = "train_step" + "".join(f"_{name}" for name in args.only or [])
    out = Path(args.out) if args.out else harness.RUNS_DIR / stem
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"meta": meta, "rows": rows, "workers": results}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(text + "\n")
    wrote = f"{out.with_suffix('.json')} and {out.with_suffix('.md')}"
    print(f"\nwrote {wrote} ({meta['wall_s']:.0f} s)", file=sys.stderr)


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
    p.add_argument(
        "--out",
        default=None,
        help="output path without suffix (default runs/benchmarks/<name>; benchmarks/results/<name> "
        "updates the recorded results)",
    )
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
