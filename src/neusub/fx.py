"""torch.fx on converted models: traced graphs hand out plain tensors, as the model does.

A model made by :func:`neusub.convert` returns plain tensors because its entry points
(``forward``, ``forward_features``, ...) merge the bundles in their output (their stream sums).
A ``torch.fx`` graph traced from it (by ``symbolic_trace``, torchvision's or timm's
``create_feature_extractor``) runs the same ops on the same bundles, but the tracer calls the
class's ``forward``, not the root's entry point, and a feature extractor may return any inner
node. So:

- the graph of a converted root gets a code generator whose ``return`` merges every bundle
  in the output (:class:`PlainOutputs`), whatever nodes the output is made of later: the
  values are the sums the eager model would hand out, computed by the same ``streams.sum(0)``;
- a converted model that is a submodule of the traced root merges its output in the graph
  itself (a call of :func:`plain` after its last node), as its entry point does in eager mode.

Models converted with ``guided=False`` (the paper's ablation) are refused: their activations
follow a flag that their entry point sets, which a graph does not run.
"""

from __future__ import annotations

from typing import Any

import torch.fx
from torch.utils._pytree import tree_map

from .bundle import merge_all


def plain(value: Any) -> Any:
    """``value`` with every bundle inside replaced by its stream sum (called by traced graphs)."""
    return merge_all(value)


class PlainOutputs:
    """Mixed into a graph's code generator: ``return plain(<output>)``."""

    def generate_output(self, output_args: Any, *args: Any, **kwargs: Any) -> str:
        statement = super().generate_output(output_args, *args, **kwargs)
        head = "return "
        if not statement.startswith(head):  # a code generator of torch's own that returns otherwise
            raise TypeError(f"neusub.fx: cannot merge the outputs of a graph that ends in {statement!r}")
        return f"{head}_neusub_plain({statement[len(head) :]})"

    def additional_globals(self) -> list[tuple[str, Any]]:
        return [*super().additional_globals(), ("_neusub_plain", plain)]


_PLAIN_CODEGENS: dict[type, type] = {}


def _plain_codegen_class(base: type) -> type:
    if base not in _PLAIN_CODEGENS:
        _PLAIN_CODEGENS[base] = type(f"PlainOutputs{base.__name__}", (PlainOutputs, base), {})
    return _PLAIN_CODEGENS[base]


def _check_guided(model: torch.nn.Module) -> None:
    conversion = getattr(model, "neusub_conversion", None)
    if conversion is not None and not conversion.guided:
        raise ValueError(
            f"torch.fx cannot trace {type(model).__name__} converted with guided=False (its activations "
            "follow a flag the graph does not set); trace neusub.deploy(model), or convert with guided=True"
        )


def trace_bundles(tracer: torch.fx.Tracer) -> None:
    """Called when ``tracer`` meets a layer that hands out bundles: if the traced root is a
    converted model, its graph returns plain tensors (see the module doc)."""
    root = getattr(tracer, "root", None)
    if getattr(root, "neusub_conversion", None) is None:
        return  # a converted submodule: its entry point merges in the graph (leave_traced)
    _check_guided(root)
    codegen = tracer.graph._codegen
    if not isinstance(codegen, PlainOutputs):  # the class, not the object: it keeps its state
        codegen.__class__ = _plain_codegen_class(type(codegen))


def leave_traced(model: torch.nn.Module, output: Any) -> Any:
    """A converted model's output as its exit hands it out; while tracing, proxies are merged
    as the eager exit merges bundles: a converted root's graph when it returns
    (:func:`trace_bundles`), a converted submodule's right here. Anything else unchanged."""

    def merged(value: Any) -> Any:
        if not isinstance(value, torch.fx.Proxy):
            return value
        _check_guided(model)
        if value.tracer.root is model:
            trace_bundles(value.tracer)
            return value
        return value.tracer.create_proxy("call_function", plain, (value,), {})

    return tree_map(merged, output)


__all__ = ["PlainOutputs", "leave_traced", "plain", "trace_bundles"]
