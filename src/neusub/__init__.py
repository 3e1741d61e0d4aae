"""neusub: branch-level structural re-parameterization with Neural Substitution."""

from . import export
from .convert import convert
from .deploy import check_equivalence, deploy
from .layers import CONNECTIVITIES, RepConv2d, RepLinear, set_recompute
from .models import create_model, list_models
from .recipes import Recipe, list_recipes
from .streams import (
    Add,
    Gate,
    GuidedActivation,
    GuidedMaxPool2d,
    PerStream,
    SqueezeExcite,
    StreamAdd,
    StreamBatchNorm2d,
    StreamDropout,
    StreamDropPath,
    StreamGate,
    StreamMerge,
    StreamModule,
    StreamSequential,
    list_activations,
)
from .timm_registry import register_all as register_timm_models

__version__ = "0.1.0"

register_timm_models()

__all__ = [
    "CONNECTIVITIES",
    "Add",
    "Gate",
    "GuidedActivation",
    "GuidedMaxPool2d",
    "PerStream",
    "Recipe",
    "RepConv2d",
    "RepLinear",
    "SqueezeExcite",
    "StreamAdd",
    "StreamBatchNorm2d",
    "StreamDropPath",
    "StreamDropout",
    "StreamGate",
    "StreamMerge",
    "StreamModule",
    "StreamSequential",
    "check_equivalence",
    "convert",
    "create_model",
    "list_models",
    "deploy",
    "export",
    "list_activations",
    "list_recipes",
    "set_recompute",
    "__version__",
]
