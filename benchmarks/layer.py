"""One NS layer's training cost: fast RepConv2d vs the literal reference vs one plain conv.

Setup (defaults; all flags below): nsnet recipe (N = 4 branches at stride 1), S = 4
input streams, 64 → 64 channels, 3×3, 32×32, batch 32, fp32, CPU,
``torch.set_num_threads(2)``, training mode. The input requires grad (a layer in the
middle of a network), the upstream gradient is a fixed random tensor.

Variants, measured side by side in ONE run:

- ``fast``: ``neusub.RepConv2d(connectivity="ns", stochastic=1.0)`` (a random
  partition drawn on every forward) on the ``(S, B, C, H, W)`` bundle;
- ``literal``: the same layer evaluated by :func:`neusub.reference.literal_forward`
  with a random partition per forward (every branch and stream separately);
- ``plain``: ``nn.Conv2d(64, 64, 3, padding=1)`` + ``nn.BatchNorm2d(64)`` on a
  ``(B, C, H, W)`` input — what the fused network costs in training.

Time: forward + backward of one step (``zero_grad(set_to_none=True)``, forward,
``out.backward(grad)``), median over ``--iters`` steps after ``--warmup`` steps. The
variants are *interleaved* step by step (fast, literal, plain, fast, ...), so a change of
machine load during the run hits all of them alike and the ratios stay meaningful.

Peak memory, two numbers per variant:

- ``peak RSS growth``: each variant runs in a fresh worker process that builds its module
  and inputs and runs two training steps inside :func:`harness.peak_memory`: the growth of
  resident memory over what lived before the steps, as the OS sees it (activations,
  gradients, oneDNN scratch pads, allocator slack).
- ``saved for backward``: the bytes of distinct storages autograd keeps between forward
  and backward (``torch.autograd.graph.saved_tensors_hooks``), excluding parameters and
  the input, which live anyway. Deterministic and allocator-independent; it is the part
  of the peak the implementation controls.

``--profile`` additionally breaks the fast path's step down: (1) torch.profiler's top
operators by self CPU time; (2) each component of ``RepConv2d``'s training forward,
timed forward + backward in isolation on the layer's real shapes (input moments /
covariance, kernel composition, the stacked conv, the stacked BatchNorm, the partition
einsum) next to the whole step.

Usage::

    python benchmarks/layer.py                     # table + runs/benchmarks/layer.json
    python benchmarks/layer.py --out benchmarks/results/layer.json   # update the recorded results
    python benchmarks/layer.py --profile           # + where the fast path's time goes
    python benchmarks/layer.py --threads 4 --iters 20 --no-memory
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import harness
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neusub import RepConv2d
from neusub.branches import input_moments
from neusub.partition import mixing_matrix, random_partition
from neusub.reference import literal_forward

VARIANTS = ("fast", "literal", "plain")
RESULTS = harness.RESULTS_DIR / "layer.json"
DEFAULT_OUT = harness.RUNS_DIR / "layer.json"


# --------------------------------------------------------------------------- setups


class Setup:
    """A variant ready to step: ``step()`` runs one forward + backward."""

    def __init__(self, name: str, args: argparse.Namespace, seed: int = 0):
        torch.manual_seed(seed)
        self.name = name
        b, c, hw, s = args.batch, args.channels, args.size, args.streams
        self.generator = torch.Generator().manual_seed(seed + 1)
        if name == "plain":
            self.module = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)).train()
            self.x = torch.randn(b, c, hw, hw, requires_grad=True)
        else:
            self.module = RepConv2d(
                c,
                c,
                3,
                recipe=args.recipe,
                connectivity="ns",
                in_streams=s,
                stochastic=1.0,
                generator=self.generator,
            ).train()
            self.x = torch.randn(s, b, c, hw, hw, requires_grad=True)
        with torch.no_grad():
            out = self.forward()
        self.grad = torch.randn_like(out)

    @property
    def layer(self) -> RepConv2d:
        return self.module

    def forward(self) -> Tensor:
        if self.name == "literal":
            layer = self.module
            n, s = layer.num_branches, layer.in_streams
            mixing = mixing_matrix(random_partition(s, n, self.generator), s, n)
            return literal_forward(layer, self.x, mixing)
        return self.module(self.x)

    def step(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        out = self.forward()
        out.backward(self.grad)


def saved_for_backward(setup: Setup) -> int:
    """Bytes of distinct storages autograd saves in one forward (parameters and input excluded)."""
    live = {p.untyped_storage().data_ptr() for p in setup.module.parameters()}
    live.add(setup.x.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in live:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    setup.module.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = setup.forward()
    out.backward(setup.grad)
    return sum(saved.values())


# --------------------------------------------------------------------------- measuring


def memory_worker(name: str, args: argparse.Namespace) -> dict:
    """Runs in a fresh process: peak RSS growth of two training steps of one variant."""
    setup = Setup(name, args)
    with harness.peak_memory() as memory:
        for _ in range(2):
            setup.step()
    return {"variant": name, **memory, "saved_for_backward_mib": saved_for_backward(setup) / 2**20}


def _shape_flags(args: argparse.Namespace) -> list[str]:
    names = ("threads", "batch", "channels", "size", "streams", "recipe")
    return [f"--{name}={getattr(args, name)}" for name in names]


def time_variants(setups: list[Setup], warmup: int, iters: int) -> dict[str, list[tuple[float, float]]]:
    for _ in range(warmup):
        for setup in setups:
            setup.step()
    times: dict[str, list[tuple[float, float]]] = {s.name: [] for s in setups}
    for _ in range(iters):
        for setup in setups:  # interleaved: load changes hit every variant alike
            times[setup.name].append(harness.timed(setup.step))
    return times


# --------------------------------------------------------------------------- profiling


def _categorise(events, setup: Setup, iters: int) -> dict[str, float]:
    """Self CPU ms per step by component of the fast path.

    Convolution and BatchNorm ops are known by their names; the other large ops by the
    shapes of their inputs: the partition einsum works on 6-D views of the stacked output
    and on ``(1, ·, B·C_out·H·W)`` matrices; the input moments on ``(S·B, C, H·W)`` (and
    its transpose / per-sample covariances ``(S·B, C, C)``), including the accumulation of
    their gradient into the input's. The rest are small-tensor ops: kernel composition,
    running statistics, views and autograd bookkeeping.
    """
    layer, x = setup.layer, setup.x
    s, b, c, h, w = x.shape
    columns = b * layer.geom.out_channels * h * w  # stride 1: output positions = input positions
    moment_shapes = {(s * b, c, h * w), (s * b, h * w, c), (s * b, c, c), (s * b, c, h, w)}
    totals = {
        "stacked conv (forward + backward)": 0.0,
        "stacked BatchNorm (forward + backward)": 0.0,
        "partition einsum (permute copies + bmm)": 0.0,
        "input moments / covariance": 0.0,
        "kernel composition + small ops": 0.0,
    }
    names = list(totals)
    for e in events:
        shapes = [tuple(shape) for shape in (e.input_shapes or []) if shape]
        if "convolution" in e.key:
            key = names[0]
        elif "batch_norm" in e.key:
            key = names[1]
        elif any(len(shape) >= 6 or columns in shape for shape in shapes):
            key = names[2]
        elif any(shape in moment_shapes for shape in shapes):
            key = names[3]
        else:
            key = names[4]
        totals[key] += e.self_cpu_time_total / 1e3 / iters
    return {k: round(v, 1) for k, v in totals.items()}


def profile_fast(args: argparse.Namespace, iters: int, iters_components: int = 5) -> dict:
    """Where the fast path's forward + backward time goes."""
    setup = Setup("fast", args)
    for _ in range(2):
        setup.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            setup.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48)
    events = prof.key_averages()
    total_self = sum(e.self_cpu_time_total for e in events)
    categories = _categorise(prof.key_averages(group_by_input_shape=True), setup, iters)
    by_op = sorted(
        ((e.key, e.self_cpu_time_total / 1e3 / iters, e.count // iters) for e in events),
        key=lambda r: -r[1],
    )[:15]
    parts = {**component_steps(setup, args.batch), "whole step": setup.step}
    measured = {}
    for name, fn in parts.items():
        measured[name] = [round(1e3 * t, 2) for t in harness.median_time(fn, 1, iters_components)]
    whole = measured.pop("whole step")
    return {
        "profiler_table": table,
        "profiler_top_ops_ms_per_step": [{"op": k, "self_ms": round(t, 2), "calls": c} for k, t, c in by_op],
        "profiler_total_self_ms_per_step": total_self / 1e3 / iters,
        "profiler_categories_ms": categories,
        "components_ms": {k: {"median": v[0], "min": v[1], "cpu": v[2]} for k, v in measured.items()},
        "components_sum_ms": {
            "median": round(sum(v[0] for v in measured.values()), 2),
            "min": round(sum(v[1] for v in measured.values()), 2),
            "cpu": round(sum(v[2] for v in measured.values()), 2),
        },
        "whole_step_ms": {"median": whole[0], "min": whole[1], "cpu": whole[2]},
    }


def component_steps(setup: Setup, b: int) -> dict:
    """Each component of the fast path's step, forward + backward in isolation on the layer's real shapes."""
    layer = setup.layer
    flat = setup.x.detach().reshape(-1, *setup.x.shape[2:]).requires_grad_()
    n, s = layer.num_branches, layer.in_streams
    geom = layer.geom
    with torch.no_grad():
        moments = input_moments(flat)
        weight, bias = layer.stacked_kernel_for_batch(moments, flat)
        z = layer.bn(F.conv2d(flat, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups))
    mixing = mixing_matrix(random_partition(s, n), s, n)
    z_shape = (s, b, geom.groups, n, geom.out_channels // geom.groups, z.shape[-2] * z.shape[-1])
    g_mean, g_cov = torch.randn_like(moments.mean), torch.randn_like(moments.cov())
    w_leaf, b_leaf = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    mean_leaf, rows_leaf = moments.mean.clone().requires_grad_(), moments.rows.clone().requires_grad_()
    g_w, g_b = torch.randn_like(weight), torch.randn_like(bias)
    z_leaf = z.clone().requires_grad_()
    g_z = torch.randn_like(z)
    g_mix = torch.randn(n, b, geom.groups, geom.out_channels // geom.groups, z_shape[-1])

    def moments_step() -> None:
        m = input_moments(flat)
        torch.autograd.backward([m.mean, m.cov()], [g_mean, g_cov])

    def kernel_step() -> None:
        layer.zero_grad(set_to_none=True)
        leaf = type(moments)(mean_leaf, rows_leaf, moments.count)
        w, bb = layer.stacked_kernel_for_batch(leaf, flat)
        torch.autograd.backward([w, bb], [g_w, g_b])

    def conv_step() -> None:
        out = F.conv2d(flat, w_leaf, b_leaf, geom.stride, geom.padding, geom.dilation, geom.groups)
        out.backward(g_z)

    def bn_step() -> None:
        layer.bn(z_leaf).backward(g_z)

    def einsum_step() -> None:
        out = torch.einsum("ilj,lbgjcx->ibgcx", mixing, z_leaf.view(z_shape))
        out.backward(g_mix)

    return {
        f"conv (stacked, N·C_out = {weight.shape[0]})": conv_step,
        "BatchNorm (stacked)": bn_step,
        "input moments (mean, covariance)": moments_step,
        "partition einsum": einsum_step,
        "kernel composition (+ running stats)": kernel_step,
    }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--size", type=int, default=32, help="input height = width")
    p.add_argument("--streams", type=int, default=4, help="input streams S of the NS layer")
    p.add_argument("--recipe", default="nsnet")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of the variants")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    p.add_argument("--profile", action="store_true", help="break the fast path's time down")
    p.add_argument("--profile-iters", type=int, default=3)
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"JSON output (default {DEFAULT_OUT}; pass benchmarks/results/layer.json to update the "
        "recorded results)",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def measure(args: argparse.Namespace, variants: list[str]) -> dict:
    """Memory (one worker per variant), then the interleaved timing, in this process."""
    flags = _shape_flags(args)
    memory = {} if args.no_memory else {v: harness.run_worker(__file__, v, flags) for v in variants}
    load_before = harness.load_average()
    times = time_variants([Setup(v, args) for v in variants], args.warmup, args.iters)
    load_after = harness.load_average()
    median = {v: statistics.median(w for w, _ in t) for v, t in times.items()}
    cpu = {v: statistics.median(c for _, c in t) for v, t in times.items()}

    def over_plain(values: dict, v: str) -> float | None:
        return values[v] / values["plain"] if values.get("plain") else None

    growth = {v: m["growth_mib"] for v, m in memory.items()}
    rows = [
        {
            "variant": v,
            "median_ms": 1e3 * median[v],
            "min_ms": 1e3 * min(w for w, _ in times[v]),
            "time_x_plain": over_plain(median, v),
            "cpu_ms": 1e3 * cpu[v],
            "cpu_x_plain": over_plain(cpu, v),
            "peak_growth_mib": growth.get(v),
            "memory_x_plain": over_plain(growth, v) if v in growth else None,
            "saved_for_backward_mib": memory.get(v, {}).get("saved_for_backward_mib"),
            "samples_wall_cpu_ms": [(round(1e3 * w, 1), round(1e3 * c, 1)) for w, c in times[v]],
        }
        for v in variants
    ]
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    load = {"before": load_before, "after": load_after}
    return {"config": config, **harness.machine(), "load_average": load, "rows": rows, "memory": memory}


def table(result: dict) -> str:
    """The markdown table of :func:`measure`'s result, with its setup above and the load below."""
    c = result["config"]
    header = (
        f"{c['recipe']} NS layer, S={c['streams']}, {c['channels']}→{c['channels']}, 3×3, {c['size']}², "
        f"batch {c['batch']}, fp32, CPU, {c['threads']} threads; forward + backward per step, "
        f"median of {c['iters']} interleaved steps (after {c['warmup']} warm-up)"
    )
    columns = ["variant", "wall ms (median)", "wall ms (min)", "× plain", "CPU ms (median)", "× plain"]
    columns += ["peak RSS growth MiB", "× plain", "saved for backward MiB"]
    cells = [
        [
            r["variant"],
            f"{r['median_ms']:.1f}",
            f"{r['min_ms']:.1f}",
            harness.fmt(r["time_x_plain"], ".2f"),
            f"{r['cpu_ms']:.1f}",
            harness.fmt(r["cpu_x_plain"], ".2f"),
            harness.fmt(r["peak_growth_mib"], ".0f"),
            harness.fmt(r["memory_x_plain"], ".2f"),
            harness.fmt(r["saved_for_backward_mib"], ".0f"),
        ]
        for r in result["rows"]
    ]
    load = result["load_average"]
    footer = f"load average before/after: {load['before'][0]:.1f} / {load['after'][0]:.1f}"
    return "\n".join([header, "", *harness.markdown_table(columns, "l" + "r" * 8, cells), "", footer])


def print_profile(prof: dict, steps: int) -> None:
    print(f"\nfast path, torch.profiler (self CPU, {steps} steps):\n")
    print(prof["profiler_table"])
    print("fast path, profiler self CPU time per step by category (ops attributed by tensor shape):")
    total = sum(prof["profiler_categories_ms"].values())
    for name, ms in prof["profiler_categories_ms"].items():
        print(f"  {name:44s} {ms:9.1f} ms  {100 * ms / total:5.1f}%")
    print(f"  {'total':44s} {total:9.1f} ms")
    print("\nfast path components in isolation, forward + backward each (ms: median / min wall, CPU):")
    whole = prof["whole_step_ms"]
    for name, t in [*prof["components_ms"].items(), ("sum of components", prof["components_sum_ms"])]:
        share = 100 * t["median"] / whole["median"]
        print(f"  {name:44s} {t['median']:9.1f} {t['min']:9.1f} {t['cpu']:9.1f}  ({share:.0f}% of step)")
    print(f"  {'whole step':44s} {whole['median']:9.1f} {whole['min']:9.1f} {whole['cpu']:9.1f}")


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        harness.report(memory_worker(args.worker, args))
        return None
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    result = measure(args, variants)
    result["table"] = table(result)
    print(result["table"], flush=True)
    if args.profile:
        result["profile"] = profile_fast(args, args.profile_iters)
        print_profile(result["profile"], args.profile_iters)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
