"""Recipes as data: which branches a re-parameterizable layer has.

A recipe is a function from a layer's :class:`Geometry` to a list of
:class:`Branch` specs. Branches that do not exist for a geometry (identity with
stride 2, ...) are dropped the way the original method drops them; geometries a
recipe cannot fuse raise ``ValueError`` naming the recipe, the parameter and
what is allowed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

Size = tuple[int, int]


@dataclass(frozen=True)
class Geometry:
    """Shape parameters of one layer (kernel, stride, ... as ``(h, w)`` pairs)."""

    in_channels: int
    out_channels: int
    kernel: Size
    stride: Size = (1, 1)
    padding: Size = (0, 0)
    dilation: Size = (1, 1)
    groups: int = 1

    @property
    def same_padding(self) -> Size:
        return tuple(d * (k - 1) // 2 for k, d in zip(self.kernel, self.dilation))  # type: ignore[return-value]

    @property
    def keeps_shape(self) -> bool:
        """True when an identity branch exists: stride 1 and in == out channels."""
        return self.stride == (1, 1) and self.in_channels == self.out_channels

    @property
    def depthwise(self) -> bool:
        return self.groups == self.in_channels == self.out_channels and self.groups > 1


@dataclass(frozen=True)
class Branch:
    """One branch, as data.

    kind:
      ``conv``      conv(``kernel``) → BN, centred in the layer's kernel
      ``identity``  BN of the input (needs stride 1 and in == out channels)
      ``avg``       avg-pool(layer kernel) → BN (depthwise layers)
      ``conv_kxk``  1×1 conv (``expand`` × in channels) → BN → k×k conv → BN
      ``conv_avg``  1×1 conv (out channels) → BN → avg-pool(layer kernel) → BN

    ``norm=False``: the branch enters the sum without its outer BN (QARepVGG's 1×1 and identity).
    """

    name: str
    kind: str
    kernel: Size = (1, 1)
    expand: int = 1
    norm: bool = True


@dataclass(frozen=True)
class Recipe:
    """A named recipe with its options, e.g. ``Recipe("mobileone", {"num_conv_branches": 4})``."""

    name: str
    options: dict = field(default_factory=dict)

    def branches(self, geom: Geometry) -> list[Branch]:
        return build_branches(self, geom)

    @property
    def post_norm(self) -> bool:
        """Whether the layer ends in one BatchNorm over the branch sum (``qarepvgg``)."""
        return RECIPES[self.name].post_norm


def _kxk(geom: Geometry, name: str = "kxk") -> Branch:
    return Branch(name, "conv", geom.kernel)


def _one_by_one(geom: Geometry) -> Branch:
    return Branch("1x1", "conv", (1, 1))


def _identity(geom: Geometry) -> list[Branch]:
    return [Branch("identity", "identity")] if geom.keeps_shape else []


def _plain(geom: Geometry) -> list[Branch]:
    return [_kxk(geom)]


def _conv_n(n: int) -> Callable[[Geometry], list[Branch]]:
    def recipe(geom: Geometry) -> list[Branch]:
        return [_kxk(geom, f"kxk{i}") for i in range(n)]

    recipe.__doc__ = f"{n} parallel k×k conv-BN branches (the paper's Conv×{n})."
    return recipe


def _repvgg(geom: Geometry) -> list[Branch]:
    return [_kxk(geom), _one_by_one(geom), *_identity(geom)]


def _qarepvgg(geom: Geometry) -> list[Branch]:
    # QARepVGG: the 1×1 and identity branches lose their BatchNorm (whose per-channel scales
    # give the fused kernel outliers), and one BatchNorm after the sum takes over their job.
    raw = [Branch("1x1", "conv", (1, 1), norm=False)]
    if geom.keeps_shape:
        raw.append(Branch("identity", "identity", norm=False))
    return [_kxk(geom), *raw]


def _acnet(geom: Geometry) -> list[Branch]:
    kh, kw = geom.kernel
    return [_kxk(geom), Branch("1xk", "conv", (1, kw)), Branch("kx1", "conv", (kh, 1))]


def _acnet_plus(geom: Geometry) -> list[Branch]:
    return [*_acnet(geom), _one_by_one(geom)]


def _dbb(geom: Geometry) -> list[Branch]:
    # DBB keeps the 1×1 branch and the 1×1 before the avg-pool only for
    # non-depthwise layers, and widens the 1×1→k×k branch to 2C for depthwise ones.
    if geom.groups < geom.out_channels:
        return [
            _kxk(geom),
            _one_by_one(geom),
            Branch("1x1_avg", "conv_avg"),
            Branch("1x1_kxk", "conv_kxk", geom.kernel, expand=1),
        ]
    avg = Branch("avg", "avg") if geom.in_channels == geom.out_channels else Branch("1x1_avg", "conv_avg")
    return [_kxk(geom), avg, Branch("1x1_kxk", "conv_kxk", geom.kernel, expand=2)]


def _mobileone(geom: Geometry, num_conv_branches: int = 1) -> list[Branch]:
    if not isinstance(num_conv_branches, int) or num_conv_branches < 1:
        raise ValueError(
            f"recipe 'mobileone': num_conv_branches={num_conv_branches!r} is invalid; use an integer >= 1"
        )
    branches = [_kxk(geom, f"kxk{i}") for i in range(num_conv_branches)]
    if geom.kernel != (1, 1):  # MobileOne has no scale branch for a 1×1 layer
        branches.append(Branch("scale", "conv", (1, 1)))
    return branches + _identity(geom)


def _nsnet(geom: Geometry) -> list[Branch]:
    strided = geom.stride != (1, 1)
    return [
        _kxk(geom),
        Branch("1x1_avg", "conv_avg") if strided else _one_by_one(geom),
        Branch("1x1_2c_kxk", "conv_kxk", geom.kernel, expand=2),
        Branch("1x1_4c_kxk", "conv_kxk", geom.kernel, expand=4),
    ]


@dataclass(frozen=True)
class RecipeEntry:
    """A recipe in the registry: ``branches(geom, **options)`` and what fusing it needs."""

    branches: Callable[..., list[Branch]]
    centred: bool = False  # smaller branches centred in the k×k kernel: odd kernels, "same" padding
    post_norm: bool = False  # one BatchNorm over the branch sum (qarepvgg)


RECIPES: dict[str, RecipeEntry] = {}


def register_recipe(
    name: str, branches: Callable[..., list[Branch]], *, centred: bool = False, post_norm: bool = False
) -> None:
    """Add a recipe: ``branches(geom, **options) -> [Branch, ...]`` for a layer of shape ``geom``."""
    RECIPES[name] = RecipeEntry(branches, centred, post_norm)


register_recipe("plain", _plain)
for _n in range(2, 6):
    register_recipe(f"conv{_n}", _conv_n(_n))
register_recipe("repvgg", _repvgg, centred=True)
register_recipe("qarepvgg", _qarepvgg, centred=True, post_norm=True)
register_recipe("acnet", _acnet, centred=True)
register_recipe("acnet+", _acnet_plus, centred=True)
register_recipe("dbb", _dbb, centred=True)
register_recipe("mobileone", _mobileone, centred=True)
register_recipe("nsnet", _nsnet, centred=True)


def list_recipes() -> list[str]:
    """Names accepted by ``recipe=``."""
    return list(RECIPES)


def as_recipe(recipe: str | Recipe) -> Recipe:
    if isinstance(recipe, Recipe):
        name = recipe.name
    elif isinstance(recipe, str):
        name, recipe = recipe, Recipe(recipe)
    else:
        raise ValueError(f"recipe must be a name or a neusub.Recipe, got {type(recipe).__name__}")
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return recipe


def validate_geometry(geom: Geometry, recipe_name: str = "plain") -> None:
    """Raise ``ValueError`` for shapes no conv (or this recipe) can take."""
    where = f"recipe {recipe_name!r}"
    for label, value in [
        ("in_channels", geom.in_channels),
        ("out_channels", geom.out_channels),
        ("groups", geom.groups),
    ]:
        if value < 1:
            raise ValueError(f"{where}: {label}={value} must be >= 1")
    for label, pair, low in [
        ("kernel_size", geom.kernel, 1),
        ("stride", geom.stride, 1),
        ("dilation", geom.dilation, 1),
        ("padding", geom.padding, 0),
    ]:
        if min(pair) < low:
            raise ValueError(f"{where}: {label}={pair} must be >= {low}")
    if geom.in_channels % geom.groups or geom.out_channels % geom.groups:
        raise ValueError(
            f"{where}: groups={geom.groups} must divide in_channels={geom.in_channels} "
            f"and out_channels={geom.out_channels}"
        )
    if recipe_name in RECIPES and RECIPES[recipe_name].centred:
        if any(k % 2 == 0 for k in geom.kernel):
            raise ValueError(
                f"{where}: kernel_size={geom.kernel} is even; this recipe centres smaller "
                "branches in the kernel and needs odd sizes (1, 3, 5, 7, ...)"
            )
        if geom.padding != geom.same_padding:
            raise ValueError(
                f"{where}: padding={geom.padding} cannot be fused; this recipe needs "
                f"'same' padding dilation*(k-1)//2 = {geom.same_padding} (pass padding=None)"
            )


def build_branches(recipe: str | Recipe, geom: Geometry) -> list[Branch]:
    """The branches of ``recipe`` for a layer of shape ``geom``."""
    recipe = as_recipe(recipe)
    validate_geometry(geom, recipe.name)
    try:
        return RECIPES[recipe.name].branches(geom, **recipe.options)
    except TypeError as err:  # unknown option name
        raise ValueError(f"recipe {recipe.name!r}: bad options {recipe.options}: {err}") from None
