"""``Bundle``: S streams of one feature map that any code can use as if it were their sum.

A converted network (:func:`neusub.convert`) runs its own, unchanged Python ``forward``;
the tensors between a re-parameterized layer and the point where streams merge are
``Bundle`` objects. A bundle looks like the stream sum to the code that holds it (its
``shape``, ``dtype`` and ``device`` are the sum's) and holds the streams ``(S, *shape)``
in ``.streams``. Every torch function called on it goes through :func:`dispatch`, which
applies the op's stream rule from :mod:`neusub.stream_rules` — each keeps
``Σ_s out_s == op(Σ_s in_s)`` — or, for an op without one, feeds the op the stream sum
(the streams merge there; exact, and recorded). So whatever the code does with a bundle,
the result is what it would get from the plain network: the invariant holds by
construction, for every op.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

Rule = Callable[[Callable, tuple, dict], Any]
RULES: dict[Callable, Rule] = {}


def rule(*funcs: Callable) -> Callable[[Rule], Rule]:
    """Register ``fn(func, args, kwargs)`` as the stream rule of every function in ``funcs``."""

    def register(fn: Rule) -> Rule:
        for func in funcs:
            RULES[func] = fn
        return fn

    return register


# Tensor properties whose value is computed from the data (the others, shape, dtype, ..., are
# the bundle's own metadata: those of the stream sum).
_VALUE_PROPERTIES = {"T", "mT", "H", "mH", "real", "imag", "data"}
_METADATA_METHODS = {
    Tensor.size,
    Tensor.dim,
    Tensor.ndimension,
    Tensor.numel,
    Tensor.nelement,
    Tensor.element_size,
    Tensor.is_floating_point,
    Tensor.is_complex,
    Tensor.get_device,
    Tensor.__len__,
    Tensor.is_contiguous,
    Tensor.stride,
    Tensor.storage_offset,
    Tensor.is_signed,
    # what torch.compile's AOTAutograd asks of a graph's outputs (of the wrapper, not the data)
    Tensor.untyped_storage,
    Tensor.data_ptr,
    Tensor._is_view,
    Tensor.is_inference,
    Tensor.is_conj,
    Tensor.is_neg,
}


COMPILE_BREAK = (
    "neusub: torch.compile split a converted model into several graphs while streams were live (a "
    "graph break between a re-parameterized layer and the point where its streams merge), and streams "
    "cannot cross from one compiled graph into the next exactly; remove the graph break "
    "(torch._dynamo.explain(model)(x) lists them, fullgraph=True stops at the first) or run the model "
    "uncompiled"
)


class Bundle(Tensor):
    """``S`` streams ``(S, *shape)`` seen as one tensor of ``shape`` (their sum).

    ``Bundle(streams)`` with ``streams.shape[0] == S``; ``.streams`` gives them back,
    ``.num_streams`` is ``S``. Autograd runs on the streams; the bundle itself holds no data.
    """

    streams: Tensor
    # Whether another bundle views these streams (set by the view rules): in-place ops then write
    # the streams in place, so that the other sees the change (see ``write_into``).
    aliased: bool = False

    @staticmethod
    def __new__(cls, streams: Tensor) -> Bundle:
        if isinstance(streams, Bundle):
            raise TypeError("Bundle(streams) takes a plain tensor of streams, not a Bundle")
        out = Tensor._make_wrapper_subclass(
            cls, streams.shape[1:], dtype=streams.dtype, device=streams.device, requires_grad=False
        )
        out.streams = streams
        return out

    # torch.compile: a traceable wrapper subclass, so that Dynamo puts bundles and their stream
    # rules into one graph, where AOTAutograd sees only the streams. A bundle is rebuilt from its
    # streams only where it crosses from one compiled graph into another (a graph break while
    # streams are live): AOTAutograd then keeps autograd on the wrapper, not on the streams, and
    # the gradient would stop there. That is refused (see COMPILE_BREAK).
    def __tensor_flatten__(self) -> tuple[list[str], None]:
        return ["streams"], None

    @staticmethod
    def __tensor_unflatten__(inner: dict, meta: None, outer_size: Any, outer_stride: Any) -> Bundle:
        raise RuntimeError(COMPILE_BREAK)

    @property
    def num_streams(self) -> int:
        return self.streams.shape[0]

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"Bundle(streams={self.num_streams}, shape={tuple(self.shape)}, sum={self.streams.sum(0)!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return dispatch(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        # Reached only by ops that bypass __torch_function__: feed them the stream sums.
        name = getattr(getattr(func, "overloadpacket", func), "__name__", str(func))
        record_merge(
            f"{name} (in torch's C++ code)",
            "called from inside another torch function, or with torch functions disabled; neusub "
            "cannot follow the streams there, so they are summed first",
        )
        return func(*tree_map(merge, args), **tree_map(merge, kwargs or {}))


def count(x: Any) -> int:
    """The stream count of a value: S for a bundle, 1 for anything else."""
    return x.streams.shape[0] if isinstance(x, Bundle) else 1


def merge(x: Any) -> Any:
    """A bundle's stream sum (a plain tensor); anything else unchanged."""
    return x.streams.sum(0) if isinstance(x, Bundle) else x


def wrap(streams: Tensor) -> Tensor:
    """``(S, ...)`` streams as a ``Bundle``; one stream as a plain tensor (outside a probe)."""
    if streams.shape[0] == 1 and _PROBE.get() is None:
        return streams[0]
    return Bundle(streams)


def merge_all(value: Any) -> Any:
    """Every bundle inside ``value`` (nested lists, tuples, dicts) replaced by its sum."""
    return tree_map(merge, value)


def _plain_call(func: Callable, args: tuple, kwargs: dict) -> Any:
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def dispatch(func: Callable, args: tuple, kwargs: dict) -> Any:
    """The stream rule of ``func`` on ``args`` holding bundles; merge where there is none."""
    owner = getattr(func, "__self__", None)
    if owner is not None and type(owner).__name__ == "getset_descriptor":  # a property getter
        name = owner.__name__
        if name in ("requires_grad", "grad_fn", "is_leaf"):  # autograd runs on the streams
            return getattr(args[0].streams, name)
        if name == "grad":
            return None
        if name not in _VALUE_PROPERTIES:
            return _plain_call(func, args, kwargs)
    if func in _METADATA_METHODS:
        return _plain_call(func, args, kwargs)
    if func in _REFUSED:
        raise TypeError(f"neusub: {_REFUSED[func]} is not supported on a multi-stream tensor (a Bundle)")
    out = kwargs.get("out")
    if out is not None:  # ``out=``: whatever computes the value, it is written into ``out``
        value = dispatch(func, args, {k: v for k, v in kwargs.items() if k != "out"})
        return tree_map(write_into, out, value) if isinstance(out, (tuple, list)) else write_into(out, value)
    found = RULES.get(func)
    if found is not None:
        result = found(func, args, kwargs)
    elif _mutates_first(func, args, kwargs):  # in place, no rule: on the sum, written back
        result = write_into(args[0], merged_call(func, args, kwargs, "in place, without a stream rule"))
    else:
        result = merged_call(func, args, kwargs, "no stream rule")
    probe = _PROBE.get()
    if probe is not None:
        probe.note(func, args, kwargs, result)
    return result


# Methods that change a tensor's storage or size: refused on a bundle (its streams have their own).
_REFUSED = {
    Tensor.set_: "Tensor.set_",
    Tensor.resize_: "Tensor.resize_",
    Tensor.resize_as_: "Tensor.resize_as_",
}
# In-place by name but not a write of values: they reach the wrapper (see ``dispatch``).
_NOT_WRITES = {"requires_grad_", "share_memory_", "retain_grad"}


def _mutates_first(func: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` writes its first argument, a bundle, in place: ``Tensor.clamp_``,
    ``x += y`` (``__iadd__``), ``torch.relu_``, ``F.elu(x, inplace=True)``, ..."""
    if not args or not isinstance(args[0], Bundle):
        return False
    name = getattr(func, "__name__", "")
    if name.startswith("__i") and name.endswith("__"):
        return True
    if name.endswith("_") and not name.startswith("_") and name not in _NOT_WRITES:
        return True
    position = _inplace_position(func)
    given = args[position] if position is not None and len(args) > position else False
    return bool(kwargs.get("inplace", given))


@functools.cache
def _inplace_position(func: Callable) -> int | None:
    """The positional index of a function's ``inplace`` parameter (None: it has none)."""
    try:
        names = list(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # a builtin without a signature
        return None
    return names.index("inplace") if "inplace" in names else None


def write_into(target: Any, value: Any) -> Any:
    """An in-place op's result ``value`` written into ``target``, which keeps its identity (as
    PyTorch's in-place ops do). A value of another stream count enters a bundle as its sum split
    evenly over the target's streams (exact: only the sum is promised); a plain target takes the
    sum.

    A bundle takes the new streams as they are: the old ones stay intact for autograd (a guided
    gate keeps its input for backward, where PyTorch's own in-place activations keep their output).
    Only a bundle that shares its streams with another (``aliased``: ``x[:, :2]``, ``x.view(...)``)
    has them written in place, so that the other sees the change, as a view would."""
    if not isinstance(target, Bundle):
        with torch._C.DisableTorchFunctionSubclass():
            return target.copy_(merge(value))
    streams = value.streams if isinstance(value, Bundle) else None
    if streams is None or streams.shape[0] != target.num_streams:
        streams = (merge(value) / target.num_streams).expand_as(target.streams).contiguous()
    if target.aliased:
        with torch._C.DisableTorchFunctionSubclass():
            target.streams.copy_(streams)
    else:
        target.streams = streams
    return target


def merged_call(func: Callable, args: tuple, kwargs: dict, why: str) -> Any:
    """``func`` on the stream sums (exact: the streams merge here); recorded in a probe."""
    merges = any(count(a) > 1 for a in torch.utils._pytree.tree_leaves((args, kwargs)))
    if merges:
        record_merge(getattr(func, "__name__", repr(func)), why)
    result = _plain_call(func, merge_all(args), merge_all(kwargs))
    probe = _PROBE.get()
    if probe is not None and (merges or probe.derives_from_merge((args, kwargs))):
        result = probe.mark_merged(result)
    return result


# ---------------------------------------------------------------------- the convert probe


@dataclass
class Use:
    """One op that read a tracked bundle during a probe."""

    func: Callable | str
    args: tuple
    kwargs: dict
    result: Any
    where: str


@dataclass
class Probe:
    """What one probing forward (see :func:`neusub.convert`) saw.

    ``merges``: ``(module path, op, why)`` where streams merged. ``tracked``: the bundles
    whose readers are recorded (layer outputs and what is computed from them; kept alive
    so that their ids stay unique). ``uses``: every op that read a tracked bundle.
    """

    merges: list[tuple[str, str, str]] = field(default_factory=list)
    path: list[str] = field(default_factory=list)  # the module stack, innermost last
    tracked: dict[int, Tensor] = field(default_factory=dict)
    uses: list[Use] = field(default_factory=list)
    layer_outputs: dict[str, Tensor] = field(default_factory=dict)  # re-parameterized layer -> output
    starved: list[str] = field(default_factory=list)  # layers that get one stream after a merge
    repeated: set[str] = field(default_factory=set)  # layers called more than once

    merged: set[int] = field(default_factory=set)  # ids of one-stream values computed after a merge

    def where(self) -> str:
        return self.path[-1] if self.path else "<root>"

    def mark_merged(self, result: Any) -> Any:
        """A merge's (floating) tensors as one-stream bundles, marked, so that the probe can tell
        which layers get one stream because streams merged before them."""

        def mark(value: Any) -> Any:
            if isinstance(value, Tensor) and not isinstance(value, Bundle) and value.is_floating_point():
                value = Bundle(value.unsqueeze(0))
            if isinstance(value, Bundle):
                self.tracked[id(value)] = value
                self.merged.add(id(value))
            return value

        return tree_map(mark, result)

    def derives_from_merge(self, value: Any) -> bool:
        return any(
            isinstance(v, Bundle) and id(v) in self.merged for v in torch.utils._pytree.tree_leaves(value)
        )

    def track(self, value: Any) -> None:
        for leaf in torch.utils._pytree.tree_leaves(value):
            if isinstance(leaf, Bundle):
                self.tracked[id(leaf)] = leaf

    def note(self, func: Callable | str, args: tuple, kwargs: dict, result: Any) -> None:
        """Record ``func`` if it read a tracked bundle, and track what it computed."""
        leaves = torch.utils._pytree.tree_leaves((args, kwargs))
        if any(id(leaf) in self.tracked for leaf in leaves if isinstance(leaf, Bundle)):
            # copies of the containers: code may append to a list after passing it (DenseNet)
            copied_args, copied_kwargs = tree_map(lambda v: v, args), tree_map(lambda v: v, kwargs)
            self.uses.append(Use(func, copied_args, copied_kwargs, result, self.where()))
            self.track(result)
            if self.derives_from_merge((args, kwargs)):  # still one stream: still after a merge
                for value in torch.utils._pytree.tree_leaves(result):
                    if isinstance(value, Bundle) and value.num_streams == 1:
                        self.merged.add(id(value))

    def readers(self, value: Tensor) -> list[Use]:
        return [
            use
            for use in self.uses
            if any(a is value for a in torch.utils._pytree.tree_leaves(use.args))
            or any(a is value for a in torch.utils._pytree.tree_leaves(use.kwargs))
        ]


_PROBE: contextvars.ContextVar[Probe | None] = contextvars.ContextVar("neusub_probe", default=None)
# Whether activations on bundles are guided (False: the paper's ablation, act per stream; set
# by a converted model around its forward).
GUIDED: contextvars.ContextVar[bool] = contextvars.ContextVar("neusub_guided", default=True)


@contextlib.contextmanager
def probing() -> Iterator[Probe]:
    """Record merges and readers of bundles for the duration (one forward of :func:`convert`)."""
    probe = Probe()
    token = _PROBE.set(probe)
    try:
        yield probe
    finally:
        _PROBE.reset(token)


def active_probe() -> Probe | None:
    return _PROBE.get()


def record_merge(op: str, why: str) -> None:
    probe = _PROBE.get()
    if probe is not None:
        probe.merges.append((probe.where(), op, why))
