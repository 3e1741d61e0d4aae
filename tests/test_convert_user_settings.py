"""``neusub.convert`` keeps what the user set on their modules, or refuses clearly: parametrized
(weight / spectral norm), frozen, tied, hooked and shared layers, TorchScript, BatchNorms without
running statistics, and a failing ``inplace=True`` conversion that must leave the model as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn
from torch.nn.utils import parametrizations

import neusub

DTYPE = torch.float64
X = torch.randn(2, 3, 8, 8, dtype=DTYPE, generator=torch.Generator().manual_seed(0))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DTYPE)


def _convert(model: nn.Module, **kwargs) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return neusub.convert(model, example_input=(1, 3, 8, 8), **kwargs)


def _train(model: nn.Module, steps: int = 2) -> None:
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, generator=gen, dtype=DTYPE)
        loss = F.cross_entropy(model(x), torch.arange(4) % 3)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _exact_after_training(model: nn.Module, converted: nn.Module) -> None:
    converted.eval()
    with torch.no_grad():
        assert rel_err(converted(X), model.eval()(X)) < 1e-12  # init="inherit"
    _train(converted)
    converted.eval()
    with torch.no_grad():
        assert rel_err(neusub.deploy(converted)(X), converted(X)) < 1e-9


NORMALISED = {
    "parametrizations.weight_norm": parametrizations.weight_norm,
    "parametrizations.spectral_norm": parametrizations.spectral_norm,
    "legacy weight_norm": nn.utils.weight_norm,
    "legacy spectral_norm": nn.utils.spectral_norm,
}


@pytest.mark.parametrize("name", list(NORMALISED))
def test_normalised_convs_are_left_as_they_are_with_the_reason(name: str) -> None:
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy functions are deprecated
        NORMALISED[name](model[3])
    model.eval()(X)  # spectral norm settles its power iteration in training; eval reuses it
    converted = _convert(model)
    assert [layer.path for layer in converted.neusub_conversion.layers] == ["0"]
    path, why = converted.neusub_conversion.skipped[0]
    assert path == "3" and ("parametrized" in why or "recomputed" in why)
    assert type(converted[3]).__name__ == type(model[3]).__name__  # still normalised
    _exact_after_training(model, converted)
    with pytest.raises(ValueError, match="selects 3 .* which a re-parameterized layer would drop"):
        _convert(model, layers=["3"])


def test_hooks_of_a_converted_conv_are_refused_by_name() -> None:
    model = _net()

    def count_calls(module, args, output):
        pass

    model[3].register_forward_hook(count_calls)
    with pytest.raises(ValueError, match=r"convert: 3 has hook\(s\) .*count_calls.*register them on"):
        _convert(model)


def test_a_hooked_batchnorm_stays_and_its_hook_keeps_running() -> None:
    model = _net()
    calls = []
    model[4].register_forward_hook(lambda module, args, output: calls.append(output.shape))
    converted = _convert(model)
    assert converted.neusub_conversion.layers[1].norm_path is None  # not absorbed
    assert calls == []  # the probe ran without the user's hooks
    _exact_after_training(model, converted)
    calls.clear()
    converted.train()(torch.randn(2, 3, 8, 8, dtype=DTYPE))
    assert calls == [(2, 8, 8, 8)]  # a training forward: the stream sum's shape, as in the original


def test_frozen_layers_stay_frozen_and_unconverted() -> None:
    model = _net()
    for parameter in [*model[0].parameters(), *model[1].parameters()]:
        parameter.requires_grad_(False)
    model[4].weight.requires_grad_(False)  # a frozen BN after a trainable conv
    converted = _convert(model)
    done = {layer.path: layer for layer in converted.neusub_conversion.layers}
    assert list(done) == ["3"] and done["3"].norm_path is None  # the frozen BN is not absorbed
    assert type(converted[0]) is nn.Conv2d and not converted[0].weight.requires_grad
    assert not converted[4].weight.requires_grad
    assert dict(converted.neusub_conversion.skipped)["0"].startswith("it is frozen")
    frozen_before = {id(p) for p in model.parameters() if not p.requires_grad}
    assert sum(not p.requires_grad for p in converted.parameters()) == len(frozen_before)
    before = [p.detach().clone() for p in (converted[0].weight, converted[1].weight, converted[4].weight)]
    _exact_after_training(model, converted)
    after = (converted[0].weight, converted[1].weight, converted[4].weight)
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_tied_convs_stay_tied() -> None:
    conv = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)]
    model = nn.Sequential(conv[0], nn.ReLU(), conv[1], nn.Flatten(), nn.Linear(192, 2)).to(DTYPE)
    model[2].weight = model[0].weight
    with pytest.raises(ValueError, match=r"0: its weight is shared with 2 \(tied\)"):
        _convert(model, layers="all")
    model.append(nn.Unflatten(1, (2, 1, 1)))
    model.append(nn.Conv2d(2, 2, 3, padding=1).to(DTYPE))  # an untied conv: something is converted
    converted = _convert(model, layers="all")
    assert [layer.path for layer in converted.neusub_conversion.layers] == ["6"]
    assert converted[0].weight is converted[2].weight


class _Shared(nn.Module):
    """One conv called twice per forward."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(3, 3, 3, padding=1)
        self.other = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.other(self.shared(F.relu(self.shared(x)))).mean((2, 3)))


def test_a_module_called_twice_is_left_out_or_refused() -> None:
    model = _Shared().to(DTYPE)
    converted = _convert(model, stochastic=0.0)
    assert [layer.path for layer in converted.neusub_conversion.layers] == ["other"]
    assert dict(converted.neusub_conversion.skipped)["shared"].startswith("called more than once")
    _exact_after_training(model, converted)  # backward runs
    with pytest.raises(ValueError, match="selects shared, but each is called more than once"):
        _convert(model, layers=["shared", "other"])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_is_refused() -> None:
    with pytest.raises(ValueError, match="the model is a TorchScript module"):
        _convert(torch.jit.script(_net()))
    model = _net()
    model[6] = torch.jit.script(nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ValueError, match="convert: 6 is a TorchScript module"):
        _convert(model)


def test_batchnorms_without_running_statistics_deploy_exactly() -> None:
    model = _net()
    model[1] = nn.BatchNorm2d(8, track_running_stats=False).to(DTYPE)
    model[4] = nn.BatchNorm2d(8, track_running_stats=False).to(DTYPE)
    converted = _convert(model)
    _exact_after_training(model, converted)


def test_a_failing_inplace_convert_leaves_the_model_as_it_was() -> None:
    model = _net()
    with torch.no_grad():
        model[4].weight.zero_()  # branch 0 cannot absorb qarepvgg's identity through a zero scale
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model]
    with pytest.raises(ValueError, match="zero scales"):
        neusub.convert(model, recipe="qarepvgg", example_input=(1, 3, 8, 8), inplace=True)
    assert [type(m) for m in model] == types
    assert getattr(model, "neusub_conversion", None) is None
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_full_backward_hook_where_streams_flow_is_refused_by_name() -> None:
    """Its gradient would be one per stream, not the one tensor's gradient the hook expects."""
    converted = _convert(_net())
    converted[2].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    with pytest.raises(RuntimeError, match=r"full backward hook \(register_full_backward_hook\) on '2'"):
        converted(x).sum().backward()
    converted[2]._backward_hooks.clear()
    seen = []  # a tensor hook on a merged output sees that tensor's gradient
    output = converted(x)
    output.register_hook(seen.append)
    output.sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], torch.ones_like(output))
