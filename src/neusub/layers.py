"""Re-parameterizable layers: RepConv2d and RepLinear.

Training forward (docs/design.md §3): every branch becomes one k×k kernel (sequential
branches composed analytically), the kernels are stacked into **one** conv over
the ``(S·B)`` batch followed by **one** BatchNorm over ``N·C_out`` channels (per-
channel statistics over all S inputs of each branch), and the pairs are
partitioned into output streams by a small mixing matrix, without copies per pair.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fusion
from .batchnorm import (
    batch_norm_of_channels,
    count_batch,
    leave_constant_out,
    running_affine,
)
from .branches import Moments, input_moments, make_branch
from .bundle import Bundle, active_probe, wrap
from .partition import draw_mixing, partition_sum
from .recipes import Geometry, Recipe, as_recipe, build_branches
from .recompute import recomputed_batch_norm
from .streams import (
    MAX_NAIVE_STREAMS,
    StreamModule,
    check_probability,
    check_streams,
    is_proxy,
    sum_batch_norm,
)

CONNECTIVITIES = ("block", "ns", "naive")
BLOCK_PATHS = ("grouped", "stacked")


def _pair(value: int | tuple[int, int], what: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{what}={value!r} must be an int or a pair of ints")
    return pair  # type: ignore[return-value]


def _without_autocast(x: Tensor):
    """Autocast off on ``x``'s device (the meta device of a convert probe has none)."""
    return contextlib.nullcontext() if x.is_meta else torch.autocast(x.device.type, enabled=False)


class _RepLayer(StreamModule):
    """Branches + one stacked BatchNorm + connectivity; shared by RepConv2d and RepLinear."""

    def _build(
        self,
        geom: Geometry,
        recipe: str | Recipe,
        connectivity: str,
        in_streams: int,
        stochastic: float,
        neural_drop: float,
        generator: torch.Generator | None,
        recompute: bool,
        bn: type[nn.Module],
    ) -> None:
        if connectivity not in CONNECTIVITIES:
            raise ValueError(
                f"unknown connectivity {connectivity!r}; choose one of {', '.join(CONNECTIVITIES)}"
            )
        self.recipe = as_recipe(recipe)
        specs = build_branches(self.recipe, geom)
        self.geom, self.connectivity = geom, connectivity
        self.stochastic = check_probability(stochastic, "stochastic")
        self.neural_drop = check_probability(neural_drop, "neural_drop")
        self.generator = generator
        self.recompute = recompute
        self.branches = nn.ModuleDict({spec.name: make_branch(spec, geom) for spec in specs})
        self._num_branches = len(specs)  # kept after reparameterize() drops the branches
        # One BN for all branches; channels ordered (groups, branch, C_out // groups) so a
        # single grouped conv can produce every branch (see stacked_kernel_for_batch). Branches without
        # BN (norm=False) keep their channels out of it: ``normed_channels`` lists the others.
        per_group = geom.out_channels // geom.groups
        slots = itertools.product(range(geom.groups), enumerate(specs), range(per_group))
        normed = [(g * len(specs) + j) * per_group + c for g, (j, spec), c in slots if spec.norm]
        partial = torch.tensor(normed) if len(normed) < len(specs) * geom.out_channels else None
        self.register_buffer("normed_channels", partial, persistent=False)
        self.bn = bn(len(normed))
        self.post_bn = bn(geom.out_channels) if self.recipe.post_norm else None
        self.set_in_streams(in_streams)

    @property
    def _like(self) -> Tensor:
        """A tensor of the layer's dtype and device: kernels and moments are made like it."""
        tensors = itertools.chain(self.bn.parameters(), self.bn.buffers(), self.parameters())
        return next(t for t in tensors if t.is_floating_point())

    # Set by neusub.convert: inputs and outputs are Bundles (plain tensors when one stream).
    bundle_io: bool = False

    def forward(self, *args: Tensor) -> Tensor:
        if not self.bundle_io or self.deployed or is_proxy(args[0]):
            return super().forward(*args)
        return self._forward_bundle(args[0])

    def _forward_bundle(self, x: Tensor) -> Tensor:
        """A :class:`~neusub.bundle.Bundle` (or plain tensor) in, a bundle out (see ``bundle_io``).

        In a probe of :func:`neusub.convert` the layer takes its static ``in_streams`` from
        the input and records who reads its output."""
        streams = x.streams if isinstance(x, Bundle) else x.unsqueeze(0)
        probe = active_probe()
        if probe is not None:
            if probe.where() in probe.layer_outputs:  # a shared module: convert leaves it out
                probe.repeated.add(probe.where())
            self.set_in_streams(streams.shape[0])
            if streams.shape[0] == 1 and probe.derives_from_merge(x):
                probe.starved.append(probe.where())
        elif streams.shape[0] == 1 and self.in_streams > 1:
            # A plain tensor where the forward passes streams (e.g. the user calls forward_head on
            # merged features): it enters as x / S in each stream, exact as any one-stream operand.
            streams = (streams / self.in_streams).expand(self.in_streams, *streams.shape[1:])
        plain_shape = streams.shape[1:]
        if isinstance(self, RepLinear) and streams.dim() > 4:  # (S, B, *mid, D) → (S, B, T, D)
            streams = streams.reshape(streams.shape[0], streams.shape[1], -1, streams.shape[-1])
        out = super().forward(streams[0] if self.connectivity == "block" else streams)
        if self.connectivity == "block":
            out = out.unsqueeze(0)
        if isinstance(self, RepLinear):
            out = out.reshape(out.shape[0], *plain_shape[:-1], out.shape[-1])
        result = wrap(out)
        if probe is not None:
            probe.note(type(self).__name__, (x,), {}, result)
            probe.layer_outputs[probe.where()] = result
            probe.track(result)
        return result

    @property
    def num_branches(self) -> int:
        return self._num_branches

    @property
    def out_streams(self) -> int:
        if self.connectivity == "block":
            return 1
        if self.connectivity == "ns":
            return self.num_branches
        return self.in_streams * self.num_branches

    def set_in_streams(self, streams: int) -> int:
        streams = check_streams(streams)
        if self.connectivity == "block" and streams != 1:
            raise ValueError(
                f"connectivity='block' takes a plain tensor (in_streams=1), got in_streams={streams}; "
                "merge the streams first or use connectivity='ns'"
            )
        if self.connectivity == "naive" and streams * self.num_branches > MAX_NAIVE_STREAMS:
            raise ValueError(
                f"connectivity='naive' would make {streams * self.num_branches} streams "
                f"(in_streams={streams} × {self.num_branches} branches), over the limit of "
                f"{MAX_NAIVE_STREAMS}; use connectivity='ns' for deep networks"
            )
        self.in_streams = streams
        return self.out_streams

    # ------------------------------------------------------------------ kernels

    def _split(self, tensor: Tensor) -> Tensor:
        """``(N·C_out, ...)`` in BN order → ``(N, C_out, ...)`` in branch order."""
        g, n = self.geom.groups, self.num_branches
        return tensor.reshape(g, n, -1, *tensor.shape[1:]).transpose(0, 1).reshape(n, -1, *tensor.shape[1:])

    def stacked_kernel_for_batch(
        self,
        moments: Moments | None,
        like: Tensor,
        which: list[int] | None = None,
        size: tuple[int, int] | None = None,
    ) -> fusion.Kernel:
        """Branches (all, or those at ``which``) as one conv in BN order for a training forward
        over input ``moments`` (inner BNs record the batch: ``BranchModule.kernel_for_batch``):
        ``((n·C_out, C_in/g, kh, kw), (n·C_out,))``; ``size`` defaults to the layer's kernel."""
        branches = list(self.branches.values())
        chosen = [branches[j] for j in which] if which is not None else branches
        size = size or self.geom.kernel
        kernels, biases = zip(*(b.kernel_for_batch(moments, like, size) for b in chosen))
        g, n = self.geom.groups, len(chosen)

        def to_bn_order(t: Tensor) -> Tensor:
            return t.reshape(n, g, -1, *t.shape[2:]).transpose(0, 1).reshape(-1, *t.shape[2:])

        return to_bn_order(torch.stack(kernels)), to_bn_order(torch.stack(biases))

    def stacked_affine(self) -> tuple[Tensor, Tensor]:
        """Every branch's outer BN in eval mode as ``(scale, shift)``, each ``(N·C_out,)`` in BN
        order; a branch without BN is ``(1, 0)``."""
        scale, shift = running_affine(self.bn)
        if self.normed_channels is None:
            return scale, shift
        total = self.num_branches * self.geom.out_channels
        return (
            scale.new_ones(total).index_copy(0, self.normed_channels, scale),
            shift.new_zeros(total).index_copy(0, self.normed_channels, shift),
        )

    def branch_kernels(self) -> list[fusion.Kernel]:
        """Each branch fused with its BN in eval mode: ``[(kernel, bias)]`` in branch order."""
        scale, shift = self.stacked_affine()
        scales, shifts = self._split(scale), self._split(shift)
        like = scale
        return [
            fusion.fold_conv_bn(*branch.kernel(like, self.geom.kernel), scales[j], shifts[j])
            for j, branch in enumerate(self.branches.values())
        ]

    def fused_kernel(self) -> fusion.Kernel:
        """The deployed op on the stream sum, computed in fp64: ``Σ_j W_j``, ``S · Σ_j b_j``."""
        dtype = self._like.dtype
        exact = copy.deepcopy(self).to(torch.float64) if dtype != torch.float64 else self
        kernel, bias = fusion.sum_branches(exact.branch_kernels())
        bias = bias * self.in_streams
        if exact.post_bn is not None:
            kernel, bias = fusion.fold_conv_bn(kernel, bias, *running_affine(exact.post_bn))
        return kernel.to(dtype), bias.to(dtype)

    # ------------------------------------------------------------------ forward

    def _moments(self, flat: Tensor) -> Moments | None:
        """The input's channel moments when a composed branch's inner BN uses batch statistics
        (by that BN's own mode: a frozen BN in a training network uses its running ones), else None."""
        if not any(b.needs_moments for b in self.branches.values()):
            return None
        return input_moments(flat.to(self._like.dtype), self.geom.groups)

    def _run_branches(self, flat: Tensor, op) -> Tensor:
        """``op(flat, weight, bias)`` with every branch stacked, then the stacked BN."""
        bn = self.bn
        # Kernels and moments in the parameters' dtype even under autocast (AMP): they are
        # small, and composing them in bf16 would lose the exactness the fusion relies on.
        with _without_autocast(flat):
            weight, bias = self.stacked_kernel_for_batch(self._moments(flat), self._like)
        if self.normed_channels is not None:  # branches without BN: normalise only the others
            z = op(flat, weight, bias)
            normed = bn(z.index_select(1, self.normed_channels))
            return z.index_copy(1, self.normed_channels, normed.to(z.dtype))
        if self.recompute and bn.training and type(bn) in (nn.BatchNorm1d, nn.BatchNorm2d):
            return recomputed_batch_norm(lambda x, w: op(x, w, None), flat, weight, bias, bn)
        if leave_constant_out(bn, bias):
            return bn(op(flat, weight, None))  # the bias, which cannot change the output, left out
        return bn(op(flat, weight, bias))

    def _post_normed(self, out: Tensor) -> Tensor:
        """The recipe's BatchNorm after the branch sum, on the layer's output ``(S', B, C', ...)``
        (block: ``(B, C', ...)``): over streams it normalises with the statistics of their sum,
        so the streams still sum to the block network's output."""
        if self.post_bn is None:
            return out
        if self.connectivity == "block":
            return self.post_bn(
                out if isinstance(self, RepConv2d) else out.reshape(-1, out.shape[-1])
            ).reshape(out.shape)
        rows = out if isinstance(self, RepConv2d) else out.reshape(out.shape[0], -1, out.shape[-1])
        return sum_batch_norm(rows, self.post_bn).reshape(out.shape)

    def _connect(self, z: Tensor, streams: int) -> Tensor:
        """``z``: ``(S, rows, g, N, C_out/g, L)`` → ``(out_streams, rows, g, C_out/g, L)``."""
        if self.connectivity == "block":
            return z.sum(3)
        if self.connectivity == "naive":
            return z.movedim(3, 1).reshape(-1, *z.shape[1:3], *z.shape[4:])
        n = self.num_branches
        if not self.training or (self.stochastic == 0 and self.neural_drop == 0):
            return z.sum(0).movedim(2, 0)  # output i = branch i over every input stream
        mixing = draw_mixing(z.shape[1], streams, n, self.stochastic, self.neural_drop, self.generator)
        return partition_sum(z, mixing)

    def _check_features(self, x: Tensor, dim: int, expected: int, what: str) -> None:
        if x.shape[dim] != expected:
            raise ValueError(
                f"{type(self).__name__} expects {expected} {what} at dim {dim}, got shape {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        g = self.geom
        return (
            f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel}, stride={g.stride}, "
            f"padding={g.padding}, dilation={g.dilation}, groups={g.groups}, recipe={self.recipe.name!r}, "
            f"connectivity={self.connectivity!r}, stochastic={self.stochastic}, "
            f"neural_drop={self.neural_drop}, "
            + ("recompute=True, " if self.recompute else "")
            + super().extra_repr()
        )


class RepConv2d(_RepLayer):
    """Re-parameterizable conv with ``recipe`` branches and ``connectivity`` between layers.

    - ``block``: ``(B, C, H, W) → (B, C', H', W')``, the sum of the branches.
    - ``ns``: ``(S, B, C, H, W) → (N, B, C', H', W')`` (4-D input allowed when ``in_streams == 1``).
    - ``naive``: ``(S, B, ...) → (S·N, B, ...)``, every path kept.

    ``padding=None`` is "same"-style ``dilation * (k - 1) // 2``. ``stochastic=p``
    re-draws the partition of the ``N·S`` pairs with probability p per training
    forward; ``neural_drop=p`` drops pairs per sample. Both are no-ops in eval.
    ``recompute=True`` runs the stacked conv again in backward instead of keeping its
    ``N·S``-stream output (less memory, one more conv; see :mod:`neusub.recompute`).

    Two execution paths, same values: ``"stacked"`` runs every branch in one stacked k×k conv
    and BatchNorm (always so under ``ns``/``naive``); ``block_path="grouped"`` (the default)
    runs block connectivity by cost instead, 1×1 branches as 1×1 convs (see
    :meth:`block_groups`); ``"stacked"`` there sends every branch through the stacked BN.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        recipe: str | Recipe = "dbb",
        connectivity: str = "block",
        in_streams: int = 1,
        stochastic: float = 0.0,
        neural_drop: float = 0.0,
        generator: torch.Generator | None = None,
        recompute: bool = False,
        block_path: str = "grouped",
    ):
        super().__init__()
        if block_path not in BLOCK_PATHS:
            raise ValueError(f"block_path={block_path!r}; choose one of {', '.join(BLOCK_PATHS)}")
        self.block_path = block_path
        kernel, dil = _pair(kernel_size, "kernel_size"), _pair(dilation, "dilation")
        same = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dil))
        geom = Geometry(
            in_channels,
            out_channels,
            kernel,
            _pair(stride, "stride"),
            same if padding is None else _pair(padding, "padding"),
            dil,
            groups,
        )
        self._build(
            geom,
            recipe,
            connectivity,
            in_streams,
            stochastic,
            neural_drop,
            generator,
            recompute,
            nn.BatchNorm2d,
        )

    plain_dim = 4  # (B, C, H, W); a bundle is (S, B, C, H, W)

    def block_groups(self) -> dict[str, list[int]] | None:
        """Block connectivity runs branches by their own cost: ``{"kxk": [...], "pointwise": [...],
        "pool": [...]}`` (branch indices; 1×1 convs and identity as a 1×1 conv, 1×1 → BN → avg as
        a 1×1 conv then avg-pool), or ``None`` where everything goes in one stacked k×k conv."""
        g = self.geom
        if (
            self.block_path != "grouped"
            or self.connectivity != "block"
            or self.recompute
            or self.normed_channels is not None
            or g.groups != 1
            or g.kernel == (1, 1)
            or g.padding != g.same_padding
            or type(self.bn) is not nn.BatchNorm2d
        ):
            return None
        groups: dict[str, list[int]] = {"kxk": [], "pointwise": [], "pool": []}
        for j, branch in enumerate(self.branches.values()):
            groups[branch.block_group(g)].append(j)
        return groups if groups["pointwise"] or groups["pool"] else None

    def _batch_norm_branches(self, y: Tensor, which: list[int], bias: Tensor, rate: float | None) -> Tensor:
        """The stacked BN on the channels of branches ``which`` (groups=1: branch j owns
        channels ``j·C … (j+1)·C``); ``rate``: this step's running-stat rate (None: no update)."""
        bn, c = self.bn, self.geom.out_channels
        index = torch.cat([torch.arange(j * c, (j + 1) * c, device=y.device) for j in which])
        return batch_norm_of_channels(bn, y, index, bias, rate)

    def _forward_block_groups(self, flat: Tensor, groups: dict[str, list[int]]) -> Tensor:
        """``(B, C_in, H, W)`` → ``(B, H', W', C_out)``: Σ over branches, each group its own conv."""
        g, bn = self.geom, self.bn
        with _without_autocast(flat):  # as in _run_branches
            moments = self._moments(flat)
            kernels = {
                name: self.stacked_kernel_for_batch(
                    moments, self._like, which, (1, 1) if name != "kxk" else None
                )
                for name, which in groups.items()
                if which
            }
        rate = count_batch(bn)  # one batch for all groups
        out = None
        for name, (weight, bias) in kernels.items():
            if name == "kxk":
                z = F.conv2d(flat, weight, None, g.stride, g.padding, g.dilation)
            elif name == "pointwise":  # centred 1×1 with "same" padding: a 1×1 conv without padding
                z = F.conv2d(flat, weight, None, g.stride)
            else:  # BN-and-pad with count_include_pad: avg-pool of the zero-padded 1×1 output
                z = F.conv2d(flat, weight)
                z = F.avg_pool2d(z, g.kernel, g.stride, g.padding, count_include_pad=True)
            z = self._batch_norm_branches(z, groups[name], bias, rate)
            if z.requires_grad:  # BN's backward is ~5× slower when its gradient has another layout
                z.register_hook(lambda grad: grad.contiguous(memory_format=torch.channels_last))
            b, _, h, w = z.shape
            branch_sum = z.permute(0, 2, 3, 1).reshape(b, h, w, -1, g.out_channels).sum(3)
            out = branch_sum if out is None else out + branch_sum
        return out

    def forward_streams(self, x: Tensor) -> Tensor:
        bundle = self._bundle(x)
        self._check_features(bundle, 2, self.geom.in_channels, "input channels")
        s, b = bundle.shape[:2]
        g = self.geom
        kernel_h, kernel_w = g.kernel
        if bundle.shape[3] + 2 * g.padding[0] < g.dilation[0] * (kernel_h - 1) + 1 or (
            bundle.shape[4] + 2 * g.padding[1] < g.dilation[1] * (kernel_w - 1) + 1
        ):
            raise ValueError(
                f"RepConv2d: input {tuple(bundle.shape[-2:])} is smaller than the (dilated) kernel "
                f"{g.kernel} with padding {g.padding}"
            )
        # channels_last: the wide stacked conv runs ~25% faster in it on CPU (oneDNN), and the
        # pairs then sit as (S, B, H', W', groups, N, C'/g) in memory, so positions join the
        # group axis of _connect as a free view. Outputs keep that layout (a permuted view).
        flat = bundle.reshape(s * b, *bundle.shape[2:]).contiguous(memory_format=torch.channels_last)
        groups = self.block_groups()
        if groups is not None:
            return self._forward_block_groups(flat, groups).permute(0, 3, 1, 2)
        return self._forward_stacked(flat, s)

    def _forward_stacked(self, flat: Tensor, s: int) -> Tensor:
        """``(S·B, C_in, H, W)`` → ``(out_streams, B, C_out, H', W')`` (block: ``(B, ...)``):
        one stacked conv and BN for every branch, then the partition into output streams."""
        g = self.geom

        def conv(flat: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return F.conv2d(flat, weight, bias, g.stride, g.padding, g.dilation, g.groups)

        b = flat.shape[0] // s
        z = self._run_branches(flat, conv)
        h, w = z.shape[2:]
        pairs = z.permute(0, 2, 3, 1).reshape(s, b, h * w * g.groups, self.num_branches, -1, 1)
        out = self._connect(pairs, s).reshape(-1, b, h, w, g.out_channels).permute(0, 1, 4, 2, 3)
        return self._post_normed(out[0] if self.connectivity == "block" else out)

    def fuse(self) -> nn.Conv2d:
        g = self.geom
        kernel, bias = self.fused_kernel()
        conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel, g.stride, g.padding, g.dilation, g.groups)
        conv.to(device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            conv.weight.copy_(kernel)
            conv.bias.copy_(bias)
        return conv


class RepLinear(_RepLayer):
    """Re-parameterizable Linear (+BatchNorm1d per branch); recipes evaluated at k = 1.

    - ``block``: ``(..., D) → (..., D')``.
    - ``ns`` / ``naive``: bundle ``(S, B, D)`` or ``(S, B, T, D)`` → ``(N, B, [T,] D')``
      (a 2-D ``(B, D)`` input is accepted when ``in_streams == 1``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        recipe: str | Recipe = "dbb",
        connectivity: str = "block",
        in_streams: int = 1,
        stochastic: float = 0.0,
        neural_drop: float = 0.0,
        generator: torch.Generator | None = None,
        recompute: bool = False,
    ):
        super().__init__()
        geom = Geometry(in_features, out_features, (1, 1))
        self._build(
            geom,
            recipe,
            connectivity,
            in_streams,
            stochastic,
            neural_drop,
            generator,
            recompute,
            nn.BatchNorm1d,
        )

    plain_dim = 2  # (B, D) with one stream; a bundle is (S, B, [T,] D)

    def is_plain(self, x: Tensor) -> bool:
        """Block connectivity maps any ``(..., D)``; else see :meth:`StreamModule.is_plain`."""
        return self.connectivity == "block" or super().is_plain(x)

    def forward_streams(self, x: Tensor) -> Tensor:
        bundle = self._check_stream_count(x.unsqueeze(0) if self.is_plain(x) else x)
        self._check_features(bundle, -1, self.geom.in_channels, "features")
        if bundle.dim() < 3:
            raise ValueError(f"RepLinear expects a bundle (S, B, [T,] D), got shape {tuple(x.shape)}")
        s, batch_shape = bundle.shape[0], bundle.shape[1:-1]

        def linear(flat: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
            return F.linear(flat, weight.flatten(1), bias)

        z = self._run_branches(bundle.reshape(-1, bundle.shape[-1]), linear)
        # (S, B, T, N, C): the T tokens of a sample sit on _connect's "groups" axis, so that
        # neural drop draws one pair mask per sample, not per token.
        out = self._connect(z.view(s, batch_shape[0], -1, self.num_branches, self.geom.out_channels, 1), s)
        out = out.reshape(-1, *batch_shape, self.geom.out_channels)
        return self._post_normed(out[0] if self.connectivity == "block" else out)

    def fuse(self) -> nn.Linear:
        kernel, bias = self.fused_kernel()
        linear = nn.Linear(self.geom.in_channels, self.geom.out_channels)
        linear.to(device=kernel.device, dtype=kernel.dtype)
        with torch.no_grad():
            linear.weight.copy_(kernel[:, :, 0, 0])
            linear.bias.copy_(bias)
        return linear


@contextlib.contextmanager
def stacked_block_path(model: nn.Module):
    """Within the block, every RepConv2d of ``model`` runs ``block_path="stacked"``: each branch
    through the stacked BatchNorm, where a hook on ``layer.bn`` sees them all (analysis)."""
    layers = [m for m in model.modules() if isinstance(m, RepConv2d)]
    before = [layer.block_path for layer in layers]
    for layer in layers:
        layer.block_path = "stacked"
    try:
        yield
    finally:
        for layer, path in zip(layers, before):
            layer.block_path = path


def set_recompute(model: nn.Module, enabled: bool = True) -> int:
    """Turn backward recomputation of every re-parameterized layer on or off; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, _RepLayer)]
    for layer in layers:
        layer.recompute = enabled
    return len(layers)
