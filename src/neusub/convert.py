"""``neusub.convert``: any ``nn.Module`` as a multi-branch NS training structure, and back.

``convert(model)`` returns a copy of ``model`` — the same class, the same ``forward`` and
methods — in which the selected convolutions (and linears) are re-parameterized layers
(:class:`~neusub.layers.RepConv2d`, :class:`~neusub.layers.RepLinear`). Between them,
feature maps are :class:`~neusub.bundle.Bundle` tensors, so the model's own Python code
runs the stream rules of :mod:`neusub.stream_rules` on every op it applies; its outputs
are plain tensors. ``neusub.deploy(converted)`` gives back a model of the input's class
and module layout, with the fused weights in its own convs and norms.

How a conversion is built:

1. **select** the layers (``layers=``; see :func:`select_layers`);
2. **probe**: one forward of a weightless copy (meta tensors) records each layer's static
   input stream count, where streams merge and why, and who reads each layer's output;
3. **absorb** the BatchNorm that alone reads a layer's output (conv → BN becomes one
   re-parameterized layer whose branches each have their BN, as RepVGG / DBB do); a fused
   bias that no BN absorbs goes into the conv's own bias, or into the running means of the
   BatchNorms that read the layer's output (through concatenations), or — only when none
   exists — a bias is added at deploy (reported);
4. **build** the layers with those counts; ``init="inherit"`` makes branch 0 carry the
   original conv-BN exactly and the other branches start at zero contribution.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import fusion, stream_rules  # noqa: F401  (stream_rules registers the stream rules)
from .batchnorm import is_batchnorm_act, is_plain_batchnorm
from .bundle import GUIDED, Bundle, Probe, merge_all, probing
from .copies import module_copy, weightless_copy
from .cost import TrainingCost, training_cost
from .fx import leave_traced
from .layers import CONNECTIVITIES, RepConv2d, RepLinear
from .recipes import Geometry, Recipe, as_recipe, build_branches
from .streams import check_probability

LayerSpec = str | Sequence[str] | Callable[[str, nn.Module], Any] | dict | None

# ---------------------------------------------------------------------- the record


@dataclass
class ConvertedLayer:
    """One re-parameterized layer and what deploying it needs."""

    path: str
    recipe: str | Recipe  # a Recipe when it has options (they build the layer at install)
    in_streams: int
    original: nn.Module  # the input model's conv / linear (weightless copy: class and settings)
    norm_path: str | None = None  # the BatchNorm absorbed into the layer
    norm: nn.Module | None = None  # its weightless copy
    bias_sinks: list[tuple[str, int]] = field(default_factory=list)  # BNs taking the fused bias


@dataclass
class Conversion:
    """What :func:`convert` did; ``str()`` is a readable report. Kept on the converted model
    as ``model.neusub_conversion`` (and removed by :func:`neusub.deploy`)."""

    layers: list[ConvertedLayer]
    skipped: list[tuple[str, str]]  # (module path, why it was not re-parameterized)
    merges: list[tuple[str, str, str]]  # (module path, op, why the streams merged there)
    connectivity: str
    guided: bool
    starved: list[str] = field(default_factory=list)  # layers that get one stream after a merge
    notes: list[str] = field(default_factory=list)
    example_shape: tuple[int, ...] = ()  # the probe's input, batch first
    # The converted model, weakly: a report neither keeps its model alive nor pickles it. Its
    # training cost is counted from it on first use (a copy's report counts from the copy).
    _model: weakref.ref | None = field(default=None, init=False, repr=False, compare=False)
    _cost: TrainingCost | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def cost(self) -> TrainingCost:
        """:func:`neusub.training_cost` of the converted model at the probe's input shape (counted
        on first use: three forwards on meta tensors, seconds on a large model)."""
        if self._cost is None:
            model = self._model() if self._model is not None else None
            if model is None:
                raise ValueError("the converted model is not at hand (a pickled copy's report)")
            self._cost = training_cost(model, self.example_shape[1:])
        return self._cost

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_model": None}  # a weak reference does not pickle (a counted cost does)

    def __deepcopy__(self, memo: dict) -> Conversion:
        """A copy whose model is the copy of this one's, when a deep copy of the model made it."""
        copied = copy.copy(self)
        memo[id(self)] = copied
        for name, value in vars(self).items():
            if name != "_model":
                setattr(copied, name, copy.deepcopy(value, memo))
        model = self._model() if self._model is not None else None
        copied._model = (
            weakref.ref(memo[id(model)]) if model is not None and id(model) in memo else self._model
        )
        return copied

    def __str__(self) -> str:
        lines = [f"{len(self.layers)} re-parameterized layers ({self.connectivity} connectivity):"]
        for layer in self.layers:
            norm = f" + {layer.norm_path}" if layer.norm_path else ""
            lines.append(f"  {layer.path}{norm}: {layer.recipe}, {layer.in_streams} stream(s) in")
        if self.skipped:
            lines.append(f"{len(self.skipped)} left as they are:")
            lines += [f"  {path}: {why}" for path, why in self.skipped]
        if self.merges:
            lines.append(f"streams merge at {len(self.merges)} op(s) (exact; later layers fan out again):")
            lines += [f"  {path}: {op} — {why}" for path, op, why in self.merges]
        if self.starved:
            lines.append(f"after a merge, one stream reaches: {', '.join(self.starved)}")
        lines += self.notes
        if self._model is not None or self._cost is not None:
            lines.append(self._cost_line())
        return "\n".join(lines)

    def deploy(self, model: nn.Module) -> nn.Module:
        """The plain network of ``model`` (the converted model this report belongs to): what
        :func:`neusub.deploy` returns for it, which thus needs no knowledge of conversions."""
        return deploy_converted(model)

    def _cost_line(self) -> str:
        try:
            cost = self.cost
        except Exception as err:  # an estimate: a forward that cannot run twice on meta tensors only loses it
            return f"training cost: not estimated ({type(err).__name__}: {str(err)[:120]})"
        return (
            f"training cost (counted from the recipes and stream counts): {cost.describe(32)}, "
            f"{cost.multiple(1):.1f}× at batch 1"
        )


# ---------------------------------------------------------------------- which layers


def _geometry(module: nn.Module) -> Geometry:
    if isinstance(module, nn.Linear):
        return Geometry(module.in_features, module.out_features, (1, 1))
    return Geometry(
        module.in_channels,
        module.out_channels,
        tuple(module.kernel_size),
        tuple(module.stride),
        tuple(module.padding),
        tuple(module.dilation),
        module.groups,
    )


def _plain_kind(module: nn.Module) -> str | None:
    """``conv`` / ``linear`` for modules a re-parameterized layer can replace, else None."""
    if type(module).forward is nn.Conv2d.forward and isinstance(module, nn.Conv2d):
        return "conv"
    if type(module).forward is nn.Linear.forward and isinstance(module, nn.Linear):
        return "linear"
    return None


def _why_not(module: nn.Module, recipe: str | Recipe, shared_with: str | None = None) -> str | None:
    """Why ``recipe`` cannot replace ``module`` (None when it can)."""
    kept = _kept_as_it_is(module, shared_with)
    if kept is not None:
        return kept
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} (recipes fuse zero padding only)"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}; give the padding as numbers"
    try:
        build_branches(recipe, _geometry(module))
    except ValueError as err:
        return str(err)
    return None


_LEGACY_NORMS = (WeightNorm, SpectralNorm)


def _kept_as_it_is(module: nn.Module, shared_with: str | None) -> str | None:
    """Why the user's own settings of ``module`` (a parametrization, frozen or tied weights) rule
    out replacing it: a re-parameterized layer would silently drop them."""
    if parametrize.is_parametrized(module):
        kinds = ", ".join(
            f"{name}: {type(p).__name__}" for name, chain in module.parametrizations.items() for p in chain
        )
        return (
            f"its parameters are parametrized ({kinds}), which a re-parameterized layer would drop; "
            "remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) to convert it"
        )
    legacy = [type(h).__name__ for h in module._forward_pre_hooks.values() if isinstance(h, _LEGACY_NORMS)]
    if legacy:
        return (
            f"its weight is recomputed by torch.nn.utils {' and '.join(legacy)} before every forward, "
            "which a re-parameterized layer would drop; remove it (torch.nn.utils.remove_weight_norm / "
            "remove_spectral_norm) to convert it"
        )
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    if frozen:
        return (
            f"it is frozen ({', '.join(frozen)}: requires_grad=False), and a re-parameterized layer would "
            "add trainable branches; unfreeze it to convert it"
        )
    if shared_with is not None:
        return f"its weight is shared with {shared_with} (tied); a re-parameterized layer would untie them"
    return None


def _hooks_of(module: nn.Module) -> list[str]:
    """The user's forward / backward hooks on ``module``, by name."""
    hooks = [
        *module._forward_pre_hooks.values(),
        *module._forward_hooks.values(),
        *module._backward_pre_hooks.values(),
        *module._backward_hooks.values(),
    ]
    return [getattr(h, "__qualname__", type(h).__name__) for h in hooks if not isinstance(h, _LEGACY_NORMS)]


def _refuse_hooks(path: str, module: nn.Module) -> None:
    hooks = _hooks_of(module)
    if hooks:
        raise ValueError(
            f"convert: {path} has hook(s) {', '.join(hooks)}, which would not run once a re-parameterized "
            "layer replaces it; remove them (handle.remove()) and register them on "
            f"model.get_submodule({path!r}) after convert, or leave {path} out of layers="
        )


def _shared_parameters(model: nn.Module) -> dict[int, list[str]]:
    """``{id(parameter): [paths of the modules that hold it]}`` for parameters held by several."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        for parameter in module._parameters.values():
            if parameter is not None:
                owners.setdefault(id(parameter), []).append(path)
    return {key: paths for key, paths in owners.items() if len(paths) > 1}


def select_layers(model: nn.Module, layers: LayerSpec, recipe: str | Recipe) -> tuple[dict, list]:
    """``({path: recipe}, [(path, why skipped)])`` for a ``layers=`` policy:

    - ``None`` / ``"kxk"``: every ``nn.Conv2d`` with a kernel larger than 1×1 (the paper);
    - ``"all"``: every ``nn.Conv2d`` (1×1 convs and shortcuts too);
    - ``"paper"``: the official code's structure: ``nsnet`` for every k×k conv but the
      first (the stem), ``conv4`` for every 1×1 conv;
    - ``"linear"``: every ``nn.Linear`` (MLPs);
    - a list of module-path patterns (``fnmatch``, e.g. ``["layer3.*", "layer4.*"]``), or a
      dict ``{pattern: recipe}``;
    - a callable ``f(path, module)`` returning False / None (leave it), True (``recipe``)
      or a recipe.

    Layers the policy picks by default but the recipe cannot fuse (an even kernel, a
    padding other than "same" for centred recipes) are skipped with the reason; layers
    named explicitly (patterns, dict, callable) raise ``ValueError`` instead.
    """
    chosen: dict[str, str | Recipe] = {}
    skipped: list[tuple[str, str]] = []
    candidates = [(path, m) for path, m in model.named_modules() if _plain_kind(m)]
    explicit = _explicit(layers)
    first_conv = next((path for path, m in candidates if _plain_kind(m) == "conv"), None)
    shared = _shared_parameters(model)
    for path, module in candidates:
        kind = _plain_kind(module)
        pick = _pick(layers, path, module, kind, recipe, first_conv)
        if pick is None:
            continue
        tied = next((shared[id(p)] for p in module.parameters(recurse=False) if id(p) in shared), None)
        problem = _why_not(module, pick, next((o for o in tied if o != path), None) if tied else None)
        if problem is None:
            _refuse_hooks(path, module)
            chosen[path] = pick
        elif explicit:
            raise ValueError(
                f"convert: layers= selects {path} ({type(module).__name__}), but {problem}; "
                "leave it out of layers="
            )
        else:
            skipped.append((path, problem))
    return chosen, skipped


def _pick(layers: LayerSpec, path: str, module: nn.Module, kind: str, recipe, first_conv: str | None):
    """The recipe ``layers`` gives the module at ``path`` (None: leave it as it is)."""
    kernel = tuple(module.kernel_size) if kind == "conv" else (1, 1)
    if layers is None or layers == "kxk":
        return recipe if kind == "conv" and kernel != (1, 1) else None
    if layers == "all":
        return recipe if kind == "conv" else None
    if layers == "linear":
        return recipe if kind == "linear" else None
    if layers == "paper":
        if kind != "conv" or path == first_conv:
            return None
        return "conv4" if kernel == (1, 1) else "nsnet"
    if isinstance(layers, str):
        raise ValueError(
            f"convert: unknown layers={layers!r}; use kxk, all, paper, linear, patterns or a callable"
        )
    if callable(layers):
        answer = layers(path, module)
        return recipe if answer is True else (answer or None)
    if isinstance(layers, dict):
        return next((r for pattern, r in layers.items() if fnmatch.fnmatchcase(path, pattern)), None)
    return recipe if any(fnmatch.fnmatchcase(path, pattern) for pattern in layers) else None


# ---------------------------------------------------------------------- convert


def convert(
    model: nn.Module,
    recipe: str | Recipe = "nsnet",
    connectivity: str = "ns",
    stochastic: float = 1.0,
    neural_drop: float = 0.0,
    layers: LayerSpec = None,
    guided: bool = True,
    init: str = "inherit",
    example_input: Tensor | tuple[int, ...] | None = None,
    on_merge: str = "warn",
    inplace: bool = False,
) -> nn.Module:
    """The NS training structure of ``model``: the same class and forward, with the layers
    that ``layers`` selects re-parameterized by ``recipe`` (see :func:`select_layers`).

    ``example_input``: a tensor or a shape for the probe (default: timm's
    ``pretrained_cfg["input_size"]``, else ``(1, C, 224, 224)`` with C of the first conv).
    ``on_merge``: what to do when a layer after the first gets one stream because the streams
    merged before it: ``"warn"`` (one warning), ``"ignore"`` or ``"error"`` (``ValueError``
    naming the module and the op). ``init``: ``"inherit"`` (the
    converted network in eval mode computes ``model``'s function exactly before training)
    or ``"fresh"`` (the re-parameterized layers start from neusub's default initialisation).
    The result's ``neusub_conversion`` says what was done (``print`` it).
    """
    _check_arguments(model, recipe, connectivity, stochastic, neural_drop, init, on_merge)
    chosen, skipped = select_layers(model, layers, recipe)
    if not chosen:
        raise ValueError(_nothing_selected(model, layers, skipped))
    settings = dict(connectivity=connectivity, stochastic=stochastic, neural_drop=neural_drop)
    example = _example(model, example_input)
    probed = _probe(model, chosen, settings, example, guided)
    if probed.probe.repeated:  # shared modules keep one static stream count and BN per call: left out
        _leave_out_repeated(model, layers, chosen, skipped, probed.probe.repeated)
        probed = _probe(model, chosen, settings, example, guided)
    probe = probed.probe
    layers_done = [_analyse(model, probed, path, chosen[path]) for path in probe.layer_outputs]  # call order
    starved = probe.starved if connectivity == "ns" else []
    conversion = Conversion(
        layers_done, skipped, probe.merges, connectivity, guided, starved, example_shape=tuple(example.shape)
    )
    if starved and on_merge == "error":
        path, op, why = probe.merges[0]
        raise ValueError(
            f"convert: streams merge at {path} ({op}: {why}); exclude the layers before it with layers=, "
            "replace the op by one with a stream rule, or pass on_merge='warn' to let them merge (exact)"
        )
    converted = model if inplace else module_copy(model)
    # every new module first, then the swap: a failure leaves the user's model as it was
    replacements = [r for layer in layers_done for r in _replacements(converted, layer, settings, init)]
    for path, module in replacements:
        _set_submodule(converted, path, module)
    conversion.notes += [
        f"deploy adds a bias to {layer.path}: no BatchNorm reads it alone"
        for layer in layers_done
        if _needs_new_bias(layer)
    ]
    _attach(converted, conversion)
    if starved and on_merge == "warn":
        where = "; ".join(f"{path} ({op})" for path, op, _ in probe.merges[:4])
        layers_named = ", ".join(starved[:3]) + (", ..." if len(starved) > 3 else "")
        warnings.warn(
            f"neusub.convert: {len(starved)} re-parameterized layer(s) after the first get one stream "
            f"({layers_named}) because streams merge at {where}; "
            "exact, but those layers fan out again instead of substituting — print(model.neusub_conversion) "
            "for the reasons, or on_merge='ignore'",
            stacklevel=2,
        )
    return converted


def _leave_out_repeated(
    model: nn.Module, layers: LayerSpec, chosen: dict, skipped: list, repeated: set[str]
) -> None:
    """Move the layers that one forward calls more than once from ``chosen`` to ``skipped``
    (``ValueError`` where ``layers`` names them explicitly)."""
    why = (
        "called more than once in one forward (a shared module); a re-parameterized layer keeps one "
        "static stream count and one set of BatchNorm statistics per call"
    )
    names = ", ".join(sorted(repeated))
    if _explicit(layers):
        raise ValueError(f"convert: layers= selects {names}, but each is {why}; leave it out of layers=")
    for path in sorted(repeated):
        del chosen[path]
        skipped.append((path, why))
    if not chosen:
        raise ValueError(_nothing_selected(model, layers, skipped))


def _explicit(layers: LayerSpec) -> bool:
    """Whether ``layers`` names modules (patterns, a dict, a callable) rather than a policy."""
    return not (layers is None or isinstance(layers, str))


def _nothing_selected(model: nn.Module, layers: LayerSpec, skipped: list[tuple[str, str]]) -> str:
    policy = "the default layers= (every k×k nn.Conv2d)" if layers is None else f"layers={layers!r}"
    reasons = "; ".join(f"{path}: {why}" for path, why in skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
    return (
        f"convert: {policy} selects no layer of {type(model).__name__} to re-parameterize"
        + (f" ({reasons})" if reasons else "")
        + "; pick layers by kind or name: layers='all' (every conv), 'linear' (every nn.Linear, e.g. "
        "a ViT's or MLP-Mixer's), or patterns such as layers=['blocks.*']"
    )


def _check_arguments(
    model: nn.Module,
    recipe: str | Recipe,
    connectivity: str,
    stochastic: float,
    neural_drop: float,
    init: str,
    on_merge: str,
) -> None:
    """``ValueError`` naming the first argument of :func:`convert` it cannot take."""
    if connectivity not in CONNECTIVITIES:
        raise ValueError(
            f"convert: unknown connectivity {connectivity!r}; choose one of {', '.join(CONNECTIVITIES)}"
        )
    as_recipe(recipe)
    check_probability(stochastic, "stochastic")
    check_probability(neural_drop, "neural_drop")
    for name, value, allowed in (
        ("init", init, ("inherit", "fresh")),
        ("on_merge", on_merge, ("warn", "ignore", "error")),
    ):
        if value not in allowed:
            raise ValueError(f"convert: {name}={value!r} is invalid; use one of {', '.join(allowed)}")
    if getattr(model, "neusub_conversion", None) is not None:
        raise ValueError("convert: the model is already converted; deploy it first (neusub.deploy)")
    modules = model.named_modules()
    scripted = next((path for path, m in modules if isinstance(m, torch.jit.ScriptModule)), None)
    if scripted is not None:
        where = "the model" if scripted == "" else scripted
        raise ValueError(
            f"convert: {where} is a TorchScript module (torch.jit.script / trace), which cannot run on "
            "multi-stream tensors; convert the nn.Module it was made from, and script the deployed network"
        )


def _attach(converted: nn.Module, conversion: Conversion) -> None:
    """Give ``converted`` its record and its entry points: bundles inside, plain tensors out.

    Each entry point (``forward`` and timm's others) is an instance attribute that calls the
    class's method, not a forward hook: torch.compile then traces the merge into the forward's
    own graph, and no bundle has to cross into a separate one."""
    converted.neusub_conversion = conversion
    conversion._model = weakref.ref(converted)
    for name in _ENTRY_POINTS:
        if callable(getattr(type(converted), name, None)):
            setattr(converted, name, _PlainOutputs(converted, name))


_ENTRY_POINTS = ("forward", "forward_features", "forward_head", "forward_intermediates")
# How many entry points of a converted model are running (its forward, forward_features, ...):
# only the outermost returns plain tensors. Inside, ``forward`` calling ``self.forward_head``
# passes bundles on, as the probe saw them (a merge there would change the stream counts).
_DEPTH = "_neusub_depth"


def _enter(model: nn.Module) -> None:
    depth = model.__dict__.get(_DEPTH, 0)
    if depth == 0 and not model.neusub_conversion.guided:  # the ablation (torch.compile: a graph break)
        GUIDED.set(False)
    model.__dict__[_DEPTH] = depth + 1


def _leave(model: nn.Module, output: Any) -> Any:
    depth = model.__dict__[_DEPTH] - 1
    model.__dict__[_DEPTH] = depth
    if depth > 0:
        return output
    if not model.neusub_conversion.guided:
        GUIDED.set(True)
    return leave_traced(model, merge_all(output))  # leave_traced: torch.fx graphs merge too


class _PlainOutputs:
    """``model.<name>(...)`` with the bundles in its result replaced by their sums (when called
    from outside the model; see ``_DEPTH``)."""

    def __init__(self, model: nn.Module, name: str):
        self.model, self.name = model, name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        _enter(self.model)
        output = None
        try:
            output = getattr(type(self.model), self.name)(self.model, *args, **kwargs)
        except RuntimeError as err:
            if "setting up backward hooks" in str(err):  # torch's words for a hook it cannot place
                raise RuntimeError(_backward_hooks_refused(self.model)) from err
            raise
        finally:
            output = _leave(self.model, output)
        return output


def _backward_hooks_refused(model: nn.Module) -> str:
    hooked = [repr(name) if name else "the model" for name, m in model.named_modules() if m._backward_hooks]
    return (
        f"a full backward hook (register_full_backward_hook) on {', '.join(hooked) or 'a module'}: the "
        "module's output there is a bundle of streams, whose gradient is one per stream, not the "
        "gradient of one tensor the hook expects, so neusub refuses it; register the hook on the "
        "deployed network, or on the output tensor (output.register_hook) of a module after the "
        "streams merge"
    )


def _example(model: nn.Module, given: Tensor | tuple | None) -> Tensor:
    """A meta tensor for the probe, in the model's floating dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
    if isinstance(given, Tensor):
        return given.to("meta")
    if given is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        if cfg.get("input_size"):
            given = (1, *cfg["input_size"])
        elif isinstance(first, nn.Linear):
            given = (2, first.in_features)
        elif first is not None:
            given = (1, first.in_channels, 224, 224)
        else:
            raise ValueError("convert: the model has no nn.Conv2d or nn.Linear to re-parameterize")
    return torch.empty(tuple(given), device="meta", dtype=dtype)


# ---------------------------------------------------------------------- probe


def _new_layer(original: nn.Module, recipe, settings: dict, in_streams: int) -> nn.Module:
    if isinstance(original, nn.Linear):
        layer = RepLinear(
            original.in_features, original.out_features, recipe, in_streams=in_streams, **settings
        )
    else:
        g = _geometry(original)
        layer = RepConv2d(
            g.in_channels,
            g.out_channels,
            g.kernel,
            g.stride,
            g.padding,
            g.dilation,
            g.groups,
            recipe=recipe,
            in_streams=in_streams,
            **settings,
        )
    layer.bundle_io = True
    return layer


@contextlib.contextmanager
def _module_paths(model: nn.Module, probe: Probe) -> Iterator[None]:
    """Keep ``probe.path`` = the stack of modules running (for reports and analysis)."""

    def enter(path: str) -> Callable:
        return lambda module, args: probe.path.append(path) and None

    def leave(module: nn.Module, args: tuple, output: Any) -> None:
        probe.path.pop()

    handles = []
    for path, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(path or "<root>")))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class _Probed:
    probe: Probe
    shadow: nn.Module  # the weightless copy that ran
    in_streams: dict[str, int]
    owners: dict[int, str]  # id of a parameter / buffer -> path of its module

    def norm_of(self, use) -> tuple[str, nn.Module] | None:
        """The BatchNorm module whose parameters a ``batch_norm`` call uses."""
        for value in [*use.args[1:], *use.kwargs.values()]:
            if isinstance(value, Tensor) and id(value) in self.owners:
                path = self.owners[id(value)]
                return path, self.shadow.get_submodule(path)
        return None


def _probe(model: nn.Module, chosen: dict, settings: dict, example: Tensor, guided: bool) -> _Probed:
    """One eval-mode forward of a weightless copy with the chosen layers replaced."""
    shadow = weightless_copy(model).eval()
    for module in shadow.modules():  # the user's hooks observe real forwards, not the probe's
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._forward_hooks_with_kwargs):
            hooks.clear()
    for path, recipe in chosen.items():
        original = shadow.get_submodule(path)
        with torch.device("meta"):
            layer = _new_layer(original, recipe, settings, 1).to(original.weight.dtype)
        _set_submodule(shadow, path, layer.eval())
    token = GUIDED.set(guided)
    probe = None
    try:
        with probing() as probe, _module_paths(shadow, probe), torch.no_grad():
            output = shadow(example)
            probe.note("model output", (output,), {}, None)
    except Exception as err:  # data-dependent Python code cannot run on meta tensors, shape errors, ...
        if os.environ.get("NEUSUB_DEBUG"):
            raise
        raise _probe_error(probe, err) from None
    finally:
        GUIDED.reset(token)
    for path in chosen:
        if path not in probe.layer_outputs:
            raise ValueError(
                f"convert: {path} is never called by the model's forward; leave it out of layers="
            )
    owners = {
        id(t): path for path, m in shadow.named_modules() for t in (*m.parameters(False), *m.buffers(False))
    }
    in_streams = {path: shadow.get_submodule(path).in_streams for path in chosen}
    return _Probed(probe, shadow, in_streams, owners)


def _probe_error(probe: Probe | None, err: Exception) -> ValueError:
    first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    where = probe.where() if probe is not None else "<root>"
    return ValueError(
        f"convert: the probing forward failed at {where} ({type(err).__name__}: {first}); "
        "pass example_input= with a valid input shape, or exclude that module with layers="
    )


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# ---------------------------------------------------------------------- analysis

_PASS_THROUGH = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    Tensor.contiguous,
    Tensor.clone,
    torch.clone,
}


def _absorbable(module: nn.Module, channels: int) -> bool:
    """Whether the layer can take the BatchNorm ``module`` into its branches: a plain, affine BN
    with running statistics, trainable, without hooks of the user's (those stay where they are)."""
    return (
        is_plain_batchnorm(module)
        and module.num_features == channels
        and module.affine
        and module.track_running_stats
        and all(p.requires_grad for p in module.parameters())
        and not _hooks_of(module)
    )


def _analyse(model: nn.Module, probed: _Probed, path: str, recipe) -> ConvertedLayer:
    original = model.get_submodule(path)
    recipe = as_recipe(recipe)
    recipe = recipe if recipe.options else recipe.name
    layer = ConvertedLayer(path, recipe, probed.in_streams[path], weightless_copy(original))
    output = probed.probe.layer_outputs[path]
    readers = probed.probe.readers(output)
    channels = _geometry(original).out_channels
    if len(readers) == 1 and readers[0].func is F.batch_norm:
        found = probed.norm_of(readers[0])
        norm = model.get_submodule(found[0]) if found is not None else None
        if norm is not None and _absorbable(norm, channels) and readers[0].where == found[0]:
            layer.norm_path, layer.norm = found[0], weightless_copy(norm)
            return layer
    if getattr(original, "bias", None) is None:
        layer.bias_sinks = _bias_sinks(probed, output, 0) or []
    return layer


def _bias_sinks(probed: _Probed, value: Tensor, offset: int) -> list[tuple[str, int]] | None:
    """BatchNorms that read ``value``'s channels (through concatenations along channels and
    pass-through ops) and nothing else: ``[(path, channel offset)]``, or None."""
    readers = probed.probe.readers(value)
    if not readers:
        return None
    sinks: list[tuple[str, int]] = []
    for use in readers:
        if use.func is F.batch_norm:
            found = probed.norm_of(use)
            if found is None or not isinstance(found[1], nn.modules.batchnorm._BatchNorm):
                return None
            if found[1].running_mean is None:  # batch statistics only: nothing to take the bias
                return None
            sinks.append((found[0], offset))
        elif use.func in (torch.cat, torch.concat) and _cat_dim(use) == 1:
            start = 0
            for item in use.args[0]:
                if item is value:
                    break
                start += item.shape[1]
            more = _bias_sinks(probed, use.result, offset + start)
            if more is None:
                return None
            sinks += more
        elif use.func in _PASS_THROUGH:
            more = _bias_sinks(probed, use.result, offset)
            if more is None:
                return None
            sinks += more
        else:
            return None
    return sinks


def _cat_dim(use) -> int:
    dim = use.kwargs.get("dim", use.args[1] if len(use.args) > 1 else 0)
    return dim


def _needs_new_bias(layer: ConvertedLayer) -> bool:
    return layer.norm_path is None and getattr(layer.original, "bias", None) is None and not layer.bias_sinks


# ---------------------------------------------------------------------- build


def _replacements(model: nn.Module, spec: ConvertedLayer, settings: dict, init: str) -> list[tuple]:
    """``[(path, new module)]`` that re-parameterize ``spec`` in ``model``, which stays unchanged."""
    original = model.get_submodule(spec.path)
    like = original.weight
    layer = _new_layer(original, spec.recipe, settings, spec.in_streams).to(
        device=like.device, dtype=like.dtype
    )
    layer.train(original.training)
    norm = model.get_submodule(spec.norm_path) if spec.norm_path else None
    if init == "inherit":
        inherit_weights(layer, original, norm)
    if norm is None:
        return [(spec.path, layer)]
    rest = nn.Sequential(norm.drop, norm.act) if is_batchnorm_act(norm) else nn.Identity()
    return [(spec.path, layer), (spec.norm_path, rest)]


@torch.no_grad()
def inherit_weights(layer: RepConv2d | RepLinear, original: nn.Module, norm: nn.Module | None) -> None:
    """Branch 0 computes ``norm(original(Σ x))`` over the layer's ``in_streams`` streams (in
    eval mode); every other branch starts at zero contribution (its BatchNorm scale is 0, a
    conv without BN has zero weights). An identity without BN (``qarepvgg``) cannot be silenced:
    branch 0 takes it out of its own kernel instead (``W − I / a``, ``a`` its BN scale)."""
    s, bn = layer.in_streams, layer.bn
    branches = list(layer.branches.values())
    first = branches[0]
    first.weight.copy_(original.weight.reshape(first.weight.shape))
    total = layer.num_branches * layer.geom.out_channels
    scale, shift = bn.weight.new_zeros(total), bn.bias.new_zeros(total)
    mean, var = bn.running_mean.new_zeros(total), bn.running_var.new_ones(total)
    conv_bias = (
        original.bias if original.bias is not None else torch.zeros_like(scale[: layer.geom.out_channels])
    )
    index = layer._split(torch.arange(total, device=scale.device))[0]  # branch 0's channels
    if norm is not None:
        bn.eps, bn.momentum = norm.eps, norm.momentum
        scale[index], shift[index] = norm.weight, norm.bias / s
        mean[index], var[index] = (norm.running_mean - conv_bias) / s, norm.running_var
        bn.num_batches_tracked.copy_(norm.num_batches_tracked)
    else:  # an exact identity that adds the conv's bias: BN(y) = y + b
        scale[index], shift[index] = 1.0, conv_bias / s
        var[index] = 1.0 - bn.eps
    for spec, branch in list(zip(build_branches(layer.recipe, layer.geom), branches))[1:]:
        if spec.norm:  # silenced by its zero BN scale
            continue
        if spec.kind == "conv":
            branch.weight.zero_()
        elif spec.kind == "identity":
            gain = scale[index] / torch.sqrt(var[index] + bn.eps)
            if not bool((gain != 0).all()):
                raise ValueError(
                    f"init='inherit': the original BatchNorm has zero scales, so branch 0 cannot absorb the "
                    f"identity branch of recipe {layer.recipe.name!r}; use init='fresh' or another recipe"
                )
            like = first.weight
            identity = fusion.identity_kernel(
                like.shape[0], layer.geom.groups, tuple(like.shape[2:]), like=like
            )
            first.weight.sub_(identity / gain.reshape(-1, 1, 1, 1))
        else:
            raise ValueError(f"init='inherit' cannot start a {spec.kind!r} branch without BatchNorm at zero")
    keep = layer.normed_channels if layer.normed_channels is not None else slice(None)
    bn.weight.copy_(scale[keep])
    bn.bias.copy_(shift[keep])
    bn.running_mean.copy_(mean[keep])
    bn.running_var.copy_(var[keep])
    if layer.post_bn is not None:  # an exact identity: weight 1, bias 0, mean 0, var 1 − eps
        post = layer.post_bn
        post.weight.fill_(1.0)
        post.bias.zero_()
        post.running_mean.zero_()
        post.running_var.fill_(1.0 - post.eps)


# ---------------------------------------------------------------------- deploy


@torch.no_grad()
def deploy_converted(model: nn.Module) -> nn.Module:
    """A copy of the input model's class and layout with the fused weights (eval mode)."""
    conversion: Conversion = model.neusub_conversion
    plain = module_copy(model)
    for spec in conversion.layers:
        layer = plain.get_submodule(spec.path)
        if isinstance(layer, (RepConv2d, RepLinear)):
            kernel, bias = layer.fused_kernel()
        else:  # already fused in place (timm.utils.reparameterize_model): a conv / linear with bias
            kernel, bias = layer.weight, layer.bias
        module = _materialise(spec.original, kernel)
        module.weight.copy_(kernel.reshape(module.weight.shape))
        if spec.norm_path is not None:
            norm = _materialise(spec.norm, kernel)
            if is_batchnorm_act(norm):
                rest = plain.get_submodule(spec.norm_path)
                norm.drop, norm.act = rest[0], rest[1]
            _identity_norm(norm, bias)
            _set_submodule(plain, spec.norm_path, norm)
            if module.bias is not None:
                module.bias.zero_()
        elif module.bias is not None:
            module.bias.copy_(bias)
        elif spec.bias_sinks:
            for path, offset in spec.bias_sinks:
                sink = plain.get_submodule(path)
                sink.running_mean[offset : offset + bias.numel()] -= bias.to(sink.running_mean.dtype)
        else:
            module.bias = nn.Parameter(bias.clone())
        _set_submodule(plain, spec.path, module)
    del plain.neusub_conversion
    for name in (*_ENTRY_POINTS, _DEPTH):
        plain.__dict__.pop(name, None)
    return plain.eval()


def _materialise(template: nn.Module, like: Tensor) -> nn.Module:
    module = copy.deepcopy(template).to_empty(device=like.device)
    return module.to(like.dtype) if like.is_floating_point() else module


def _identity_norm(norm: nn.Module, bias: Tensor) -> None:
    """A BatchNorm that adds ``bias`` exactly: weight 1, running mean 0, running var 1 − eps."""
    norm.weight.fill_(1.0)
    norm.bias.copy_(bias)
    norm.running_mean.zero_()
    norm.running_var.fill_(1.0 - norm.eps)
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.zero_()


__all__ = ["Bundle", "Conversion", "ConvertedLayer", "convert", "deploy_converted", "select_layers"]
