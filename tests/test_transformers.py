"""Linears in transformers: ``convert(layers="linear")`` on timm's ViT and MLP-Mixer trains and
deploys exactly (streams merge where an op has no rule, e.g. attention's q·kᵀ)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import rel_err

import neusub
from neusub.bundle import Bundle

DTYPE = torch.float64
SIZE = 32


def _vit() -> torch.nn.Module:
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=SIZE, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=5
    )


def _mixer() -> torch.nn.Module:
    from timm.models.mlp_mixer import MlpMixer  # mixer_s16_224's architecture, 2 narrow blocks

    return MlpMixer(img_size=SIZE, patch_size=16, num_blocks=2, embed_dim=32, num_classes=5)


MODELS = {"vit": _vit, "mixer": _mixer}


def _converted(name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = MODELS[name]().to(DTYPE).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = neusub.convert(model, layers="linear", example_input=(1, 3, SIZE, SIZE))
    return model, converted


@pytest.mark.parametrize("name", list(MODELS))
def test_linear_conversion_of_a_transformer_trains_and_deploys_exactly(name: str) -> None:
    model, converted = _converted(name)
    assert len(converted.neusub_conversion.layers) > 0
    x = torch.randn(2, 3, SIZE, SIZE, dtype=DTYPE)
    converted.eval()
    with torch.no_grad():
        assert rel_err(converted(x), model(x)) < 1e-12  # init="inherit": the original function
    converted.train()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.05)
    for _ in range(2):
        loss = F.cross_entropy(converted(torch.randn(4, 3, SIZE, SIZE, dtype=DTYPE)), torch.arange(4) % 5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    converted.eval()
    deployed = neusub.deploy(converted)
    assert type(deployed) is type(model)
    with torch.no_grad():
        trained = converted(x)
        assert rel_err(trained, model(x)) > 1e-6  # training changed the function
        assert rel_err(deployed(x), trained) < 1e-9


@pytest.mark.parametrize("name", list(MODELS))
def test_timm_entry_points_of_a_converted_transformer_return_plain_tensors(name: str) -> None:
    """``forward`` calls ``forward_features`` and ``forward_head`` inside: those pass the streams
    on, and only a call from outside merges them."""
    model, converted = _converted(name)
    converted.eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=DTYPE)
    with torch.no_grad():
        features = converted.forward_features(x)
        logits = converted.forward_head(features)
        pre_logits = converted.forward_head(features, pre_logits=True)
        out = converted(x)
        for value in (features, logits, pre_logits, out):
            assert type(value) is torch.Tensor and not isinstance(value, Bundle)
        assert rel_err(features, model.forward_features(x)) < 1e-12
        assert rel_err(logits, out) < 1e-12
        assert rel_err(pre_logits, model.forward_head(model.forward_features(x), pre_logits=True)) < 1e-12


def test_a_convert_that_selects_no_layer_says_why_and_how_to_pick_them() -> None:
    with pytest.raises(ValueError) as raised:
        neusub.convert(_vit(), example_input=(1, 3, SIZE, SIZE))
    message = str(raised.value)
    assert "selects no layer of VisionTransformer" in message
    assert "patch_embed.proj" in message and "even" in message  # why the only candidate was skipped
    assert "'linear' (every nn.Linear" in message and "layers=['blocks.*']" in message
