"""Analyses of trained networks (paper §6, Fig. 5 and 6): what branch-level NS changes.

- :func:`branch_similarity`: per layer, cosine similarity between branch outputs and
  between output streams (Fig. 5).
- :func:`kernel_magnitudes`: mean |weight| per kernel position of the fused and of
  each branch's k×k kernels, per stage (Fig. 6a).
- :func:`block_drop`: accuracy with each identity-shortcut residual block removed (Fig. 6b).
- :func:`topology`: streams, computed pairs and distinct branch paths per layer under
  block, ns and naive connectivity (§3, Eq. 4).
- :func:`branch_statistics`: per layer and branch, the std a branch's BatchNorm normalises
  with under NS (pooled over its input streams) over the std it would have under block
  connectivity (of the stream sum), and how much random partitions move it.

All take models as built by :func:`neusub.create_model`; results are plain dicts
and lists (JSON-ready).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bundle import Bundle
from .layers import RepConv2d, _RepLayer, stacked_block_path


def rep_layers(model: nn.Module, min_branches: int = 2) -> list[tuple[str, _RepLayer]]:
    """``[(name, layer)]`` of the re-parameterized layers with at least ``min_branches`` branches."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, _RepLayer) and m.num_branches >= min_branches
    ]


def _mean_pairwise_cosine(vectors: Tensor, dim: int) -> float:
    """Mean over index pairs ``i < j`` of dim 0 of the cosine along ``dim`` (0 excluded)."""
    n = vectors.shape[0]
    sims = [
        F.cosine_similarity(vectors[i], vectors[j], dim=dim - 1, eps=1e-12).mean()
        for i in range(n)
        for j in range(i + 1, n)
    ]
    return float(torch.stack(sims).mean())


@torch.no_grad()
def branch_similarity(model: nn.Module, x: Tensor) -> list[dict]:
    """Per layer with ≥ 2 branches, on input ``x`` in eval mode:

    - ``branch``: mean cosine similarity, per pixel (conv) or token (linear) over
      channels, between the outputs of two different branches on the same input stream;
    - ``stream``: the same between two different output streams (``None`` for block).
    """
    results: dict[str, dict] = {}
    handles = []

    def watch(name: str, layer: _RepLayer) -> None:
        def on_pairs(module: nn.Module, args, z: Tensor) -> None:
            # The stacked BN's output: (S·rows, N·C, ...) with channels in (groups, branch, C/g).
            s, n, g = layer.in_streams, layer.num_branches, layer.geom.groups
            pairs = z.reshape(s, -1, g, n, z.shape[1] // (g * n), *z.shape[2:]).movedim(3, 0)
            pairs = pairs.flatten(3, 4)  # (N, S, rows, C, ...)
            results[name]["branch"] = _mean_pairwise_cosine(pairs, 3)

        def on_output(module: nn.Module, args, out: Tensor) -> None:
            out = out.streams if isinstance(out, Bundle) else out  # a converted model's layer
            channel_dim = 2 if isinstance(layer, RepConv2d) else out.dim() - 1
            results[name]["stream"] = (
                _mean_pairwise_cosine(out, channel_dim) if layer.out_streams > 1 else None
            )

        results[name] = {"layer": name, "branches": layer.num_branches, "streams": layer.out_streams}
        results[name]["branch"] = None  # branches without BN (qarepvgg) never pass the stacked BN
        if layer.normed_channels is None:
            handles.append(layer.bn.register_forward_hook(on_pairs))
        handles.append(layer.register_forward_hook(on_output))

    for name, layer in rep_layers(model):
        watch(name, layer)
    if not handles:
        raise ValueError("branch_similarity: the model has no re-parameterized layer with 2 or more branches")
    was_training = model.training
    model.eval()
    try:
        with stacked_block_path(model):  # every pair through the stacked BN, where the hook sees it
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return list(results.values())


def _stage(name: str) -> str:
    """``layer2.1.conv1`` → ``layer2``; the first component that names a stage of blocks."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i].isdigit():
            return ".".join(parts[:i])
    return parts[0]


def _position_profile(kernel: Tensor) -> Tensor:
    """``(C_out, C_in/g, kh, kw)`` → mean |w| per position, normalised to sum 1 over positions."""
    magnitude = kernel.abs().mean(dim=(0, 1))
    return magnitude / magnitude.sum().clamp_min(1e-30)


@torch.no_grad()
def kernel_magnitudes(model: nn.Module) -> dict[str, dict]:
    """Per stage: the fused (deployed) k×k kernels' mean |weight| per position, and each branch's.

    Every layer's map is normalised to sum 1 before averaging over the stage's layers,
    so layers of different widths weigh the same. Only layers with k > 1 and ≥ 2 branches.
    """
    stages: dict[str, dict] = {}
    for name, layer in rep_layers(model):
        if not isinstance(layer, RepConv2d) or max(layer.geom.kernel) == 1:
            continue
        entry = stages.setdefault(_stage(name), {"layers": [], "fused": [], "branches": {}})
        entry["layers"].append(name)
        entry["fused"].append(_position_profile(layer.fused_kernel()[0].double()))
        for branch, (kernel, _) in zip(layer.branches, layer.branch_kernels()):
            entry["branches"].setdefault(branch, []).append(_position_profile(kernel.double()))
    if not stages:
        raise ValueError("kernel_magnitudes: the model has no re-parameterized k×k conv (k > 1)")

    def average(maps: list[Tensor]) -> list[list[float]]:
        return torch.stack(maps).mean(0).tolist()

    return {
        stage: {
            "layers": e["layers"],
            "fused": average(e["fused"]),
            "branches": {b: average(maps) for b, maps in e["branches"].items()},
        }
        for stage, e in stages.items()
    }


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the residual blocks with an identity shortcut (input and output of one shape):
    modules with ``conv1``, ``conv2`` and a ``downsample`` that is None or an identity."""
    return [
        name
        for name, m in model.named_modules()
        if hasattr(m, "downsample")
        and hasattr(m, "conv1")
        and hasattr(m, "conv2")
        and (m.downsample is None or isinstance(m.downsample, nn.Identity))
    ]


@torch.no_grad()
def evaluate(
    model: Callable[[Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict:
    """Cross-entropy and top-1 accuracy of ``model`` (a module in eval mode, its mode restored
    after; or any callable, e.g. an ONNX session) over ``(x, y)`` batches (logits ``(B,
    classes)``, labels ``(B,)``): ``{"val_loss", "val_acc", "samples"}``. ``autocast``: a
    context for each forward (e.g. AMP)."""
    is_module = isinstance(model, nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    loss, correct, count = 0.0, 0, 0
    try:
        for x, y in batches:
            with autocast():
                logits = model(x)
            loss += float(F.cross_entropy(logits.float(), y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
    finally:
        if is_module:
            model.train(was_training)
    return {"val_loss": loss / max(count, 1), "val_acc": correct / max(count, 1), "samples": count}


def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy of ``model`` over ``(x, y)`` batches (see :func:`evaluate`)."""
    return evaluate(model, batches)["val_acc"]


def block_drop(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict:
    """Accuracy of ``model`` and of a copy without each identity-shortcut residual block.

    ``batches``: ``[(x, y)]``. Returns ``{"baseline": acc, "blocks": [{"block", "accuracy", "drop"}]}``.
    """
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(
            f"block_drop: {type(model).__name__} has no residual block with an identity shortcut "
            "(ResNet / ResNeXt have them)"
        )
    baseline = accuracy(model, batches)
    rows = []
    for name in blocks:
        dropped = copy.deepcopy(model)
        parent_name, _, child = name.rpartition(".")
        setattr(dropped.get_submodule(parent_name) if parent_name else dropped, child, nn.Identity())
        acc = accuracy(dropped, batches)
        rows.append({"block": name, "accuracy": acc, "drop": baseline - acc})
    return {"baseline": baseline, "blocks": rows}


def _log10(value: int) -> float:
    return math.log10(value) if value > 0 else float("-inf")


def topology(model: nn.Module) -> dict:
    """Streams, computed (stream, branch) pairs and branch paths of ``model``'s layers.

    ``model`` must be built with ``connectivity="ns"`` (its stream counts are read from
    it); block and naive counts follow from the branch counts along the layers in
    module order (naive: every path kept, so streams multiply). ``paths``: block-level
    connectivity has ``Σ_l N_l`` sub-network topologies (the paper's ``N × B``),
    branch-level ``Π_l N_l`` (``N^B``). ``log10_partitions``: distinct ways one
    stochastic NS draw can route the ``S·N`` pairs of a layer into N streams of S,
    ``(S·N)! / (S!)^N``.
    """
    layers = rep_layers(model, min_branches=1)
    if any(layer.connectivity != "ns" for _, layer in layers if layer.num_branches > 1):
        raise ValueError("topology: build the model with connectivity='ns' (stream counts are read from it)")
    rows, naive_streams = [], 1
    for name, layer in layers:
        n = layer.num_branches
        s_ns = layer.in_streams
        partitions = math.factorial(s_ns * n) // math.factorial(s_ns) ** n if n > 1 else 1
        rows.append(
            {
                "layer": name,
                "branches": n,
                "block": {"in_streams": 1, "pairs": n, "out_streams": 1},
                "ns": {
                    "in_streams": s_ns,
                    "pairs": s_ns * n,
                    "out_streams": layer.out_streams,
                    "log10_partitions": _log10(partitions),
                },
                "naive": {
                    "in_streams": naive_streams,
                    "pairs": naive_streams * n,
                    "out_streams": naive_streams * n,
                },
            }
        )
        naive_streams *= n
    branches = [row["branches"] for row in rows if row["branches"] > 1]
    paths = math.prod(branches)
    totals = {
        "layers": len(rows),
        "rep_layers": len(branches),
        "paths": {"block": sum(branches), "ns": str(paths), "naive": str(paths)},
        "log10_paths": {"block": _log10(sum(branches)), "ns": _log10(paths), "naive": _log10(paths)},
        "pairs_per_forward": {c: sum(row[c]["pairs"] for row in rows) for c in ("block", "ns", "naive")},
        "log10_partitions_per_step": sum(row["ns"]["log10_partitions"] for row in rows),
    }
    return {"layers": rows, "totals": totals}


@torch.no_grad()
def branch_statistics(model: nn.Module, x: Tensor, partitions: int = 8, seed: int = 0) -> list[dict]:
    """How NS changes what each branch's BatchNorm divides by, on input ``x``.

    With guided activations every op after a layer sees only stream sums, except the outer
    BatchNorm of each branch: under NS its statistics are pooled over the branch's S input
    streams (``σ_pooled``), under block connectivity the branch sees their sum (``σ_sum``). Per
    layer and branch: ``ratio`` = ``σ_pooled / σ_sum`` per channel, averaged over channels (1 for
    one input stream; ``1/√S`` for independent streams of equal spread, ``1/S`` for identical
    ones); measured in training mode on a copy of ``model`` (its running statistics untouched),
    over ``partitions`` forwards with freshly drawn partitions (stochastic substitution):
    ``ratio`` is their mean, ``spread`` their standard deviation. Branches without a BatchNorm
    (``qarepvgg``'s 1×1 and identity) are left out.
    """
    work = copy.deepcopy(model).train()
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)
    layers = rep_layers(work, 1)
    if not layers:
        raise ValueError("branch_statistics: the model has no re-parameterized layer")

    def watch(name: str, layer: _RepLayer):
        layer.recompute = False
        n, per_group = layer.num_branches, layer.geom.out_channels // layer.geom.groups
        channels = layer.normed_channels
        if channels is None:
            channels = torch.arange(n * layer.geom.out_channels)
        branch_of = (channels.cpu() // per_group) % n

        def on_input(bn: nn.Module, args) -> None:
            z = args[0].double()  # (S·rows, channels, ...): the branches' outputs before their BN
            streams = z.reshape(layer.in_streams, -1, *z.shape[1:])
            pooled = streams.std(dim=[d for d in range(streams.dim()) if d != 2], correction=0)
            total = streams.sum(0)
            summed = total.std(dim=[d for d in range(total.dim()) if d != 1], correction=0)
            ratio = (pooled / summed.clamp_min(1e-300)).cpu()
            for j, branch in enumerate(layer.branches):
                chosen = branch_of == j
                if chosen.any():
                    ratios[(name, branch)].append(float(ratio[chosen].mean()))

        return layer.bn.register_forward_pre_hook(on_input)

    handles = [watch(name, layer) for name, layer in layers]
    try:
        with torch.random.fork_rng(devices=[]), stacked_block_path(work):  # all through the stacked BN
            for draw in range(partitions):
                torch.manual_seed(seed + draw)
                work(x)
    finally:
        for handle in handles:
            handle.remove()
    results = []
    for name, layer in layers:
        branches = {}
        for branch in layer.branches:
            values = ratios.get((name, branch))
            if values:
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                branches[branch] = {"ratio": statistics.fmean(values), "spread": spread}
        results.append({"layer": name, "streams": layer.in_streams, "branches": branches})
    return results
