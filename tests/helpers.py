"""Helpers shared by the test files."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn


def randomize_bn(model: nn.Module, seed: int = 0) -> None:
    """Random affine parameters and running statistics (not the init) in every BatchNorm."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n, dtype = module.num_features, module.running_mean.dtype
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                module.running_mean.copy_((torch.randn(n, generator=gen) * 0.2).to(dtype))
                module.running_var.copy_((torch.rand(n, generator=gen) * 1.5 + 0.5).to(dtype))


# A registered model at its smallest: width 1/8, CIFAR stem (32² images; the adapters (B, 512)).
SMALL = {"num_classes": 5, "width_mult": 0.125, "stem": "cifar"}


def small_model(name: str, **options) -> nn.Module:
    """``timm.create_model(f"neusub_{name}", **SMALL, **options)`` with random BatchNorms, built
    once per session and shared (building converts a plain network, which costs more than most
    checks): a test that changes the model (its classifier, statistics, grads) takes a copy."""
    return _small_model(name, tuple(sorted(options.items())))


@functools.cache
def _small_model(name: str, options: tuple) -> nn.Module:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(f"neusub_{name}", **{**SMALL, **dict(options)})
    randomize_bn(model)
    return model


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """Max-norm relative error ``max|actual − expected| / max|expected|``."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def tree_digest(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder``: proof that nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def cli_fails(capsys, args: list, *matches: str, code: int = 2) -> str:
    """Run ``neusub ARGS`` in-process; assert one stderr line ``neusub: ...`` holding ``matches``
    (besides ``neusub: warning:`` lines, e.g. about a run too short to learn)."""
    from neusub.cli import main

    assert main([str(a) for a in args]) == code
    lines = capsys.readouterr().err.strip().splitlines()
    err = "\n".join(line for line in lines if not line.startswith("neusub: warning:"))
    assert err.startswith("neusub:") and "\n" not in err and "Traceback" not in err, err
    for match in matches:
        assert match.lower() in err.lower(), err
    return err
