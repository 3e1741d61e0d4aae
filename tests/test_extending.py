"""The "How to extend" examples (docs/extending.md) run as written: each code block of that section is
executed (in a fresh namespace) and its own asserts must hold. Registrations are global, so
each block runs once per session and its names are removed afterwards."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from neusub import activations, branches, models, recipes

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def _blocks() -> list[str]:
    text = EXTENDING.read_text()
    section = text.split("## How to extend", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_four_examples():
    blocks = _blocks()
    assert len(blocks) == 4
    for call in ("register_recipe", "register_activation", "register_branch_kind", "register_model"):
        assert sum(call in block for block in blocks) >= 1


@pytest.fixture
def clean_registries():
    before = (
        set(recipes.RECIPES),
        set(activations.ACTIVATIONS),
        set(branches.BRANCH_KINDS),
        set(models.list_models()),
    )
    yield
    for table, names in (
        (recipes.RECIPES, before[0]),
        (activations.ACTIVATIONS, before[1]),
        (branches.BRANCH_KINDS, before[2]),
        (models._MODELS, before[3]),
    ):
        for name in set(table) - names:
            del table[name]


@pytest.mark.parametrize("index", range(4))
def test_example_runs(index, clean_registries):
    exec(compile(_blocks()[index], f"docs/extending.md How to extend #{index + 1}", "exec"), {})


def test_registering_a_name_twice_is_an_error(clean_registries):
    import torch

    with pytest.raises(ValueError, match="already registered"):
        activations.register_activation("relu", lambda x, z, _: x, torch.nn.ReLU)
    with pytest.raises(ValueError, match="already registered"):
        branches.register_branch_kind("conv", branches.ConvBranch)


def test_unknown_branch_kind_and_block_path_are_clear_errors(clean_registries):
    import neusub
    from neusub.recipes import Branch

    neusub.register_recipe("typo", lambda geom: [Branch("kxk", "convv", geom.kernel)])
    with pytest.raises(ValueError, match=r"branch 'kxk': unknown kind 'convv'; choose one of conv, "):
        neusub.RepConv2d(4, 4, 3, recipe="typo")
    with pytest.raises(ValueError, match=r"block_path='fast'; choose one of grouped, stacked"):
        neusub.RepConv2d(4, 4, 3, block_path="fast")
