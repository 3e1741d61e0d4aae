"""A newcomer's second hour: names and values refused before torch loads, a training cost said
before training, files the tool reads back, plots that show every run they are given."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import cli_fails
from torch import nn

import neusub
from neusub.cli import main

TINY = {  # a tiny digits run
    "dataset": "digits",
    "model": "resnet18",
    "width_mult": 0.0625,
    "recipe": "dbb",
    "train_samples": 128,
    "val_samples": 64,
    "batch_size": 32,
    "epochs": 2,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, str, list[dict]]:
    """A finished tiny run of ``neusub.cli.train`` (what ``neusub train`` runs): its folder,
    what it said on stderr, and the records its ``on_epoch`` callback got."""
    from neusub.cli import train

    out = tmp_path_factory.mktemp("second_hour") / "run"
    said, seen = io.StringIO(), []
    with contextlib.redirect_stderr(said):
        train({**TINY, "out": str(out)}, on_epoch=seen.append)
    return out, said.getvalue(), seen


# ---------------------------------------------------------------------- errors before torch

REFUSED = [  # (arguments, what the one line says)
    (["train", "--recipe", "nsnett"], "unknown recipe 'nsnett'; did you mean 'nsnet'?"),
    (["train", "--recipie", "dbb"], "no option --recipie; did you mean '--recipe'?"),
    (["train", "--epoch", "2"], "no option --epoch; did you mean '--epochs'?"),  # no silent prefixes
    (["train", "--lr", "3e-3x"], "--lr '3e-3x' is not a number"),
    (["train", "--width-mult", "0"], "--width-mult=0.0 is out of range"),
    (["train", "--model", "resnet19"], "did you mean 'resnet18'?"),
    (["train", "--connectivity", "dense"], "unknown connectivity 'dense'"),
    (["train", "--threads", "0"], "--threads=0 is out of range"),
    (["export", "run", "--format", "onxx"], "unknown export format 'onxx'; did you mean 'onnx'?"),
    (["eval", "run", "--dataset", "digit"], "did you mean 'digits'?"),
    (["analyze", "run", "--what", "topo"], "did you mean 'topology'?"),
    (["trian"], "unknown command 'trian'; did you mean 'train'?"),
]
REFUSE_ALL = """
import contextlib, io, json, sys
from neusub.cli import main
said = []
for args in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        said.append((main(args), err.getvalue()))
print(json.dumps({"said": said, "torch": "torch" in sys.modules}))
"""


def test_names_and_values_are_refused_before_torch_loads(tmp_path: Path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"recipe": "nsnett"}))
    cases = [*REFUSED, (["train", "--config", str(config)], "did you mean 'nsnet'?")]
    args = json.dumps([arguments for arguments, _ in cases])
    out = subprocess.run([sys.executable, "-c", REFUSE_ALL, args], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    for (arguments, expected), (code, err) in zip(cases, result["said"]):
        assert code == 2 and err.count("\n") == 1 and err.startswith("neusub: error: "), (arguments, err)
        assert expected in err and "usage:" not in err, (arguments, err)
    assert result["torch"] is False  # every refusal above came before torch was imported


def test_names_known_before_torch_are_the_registries():
    from neusub.activations import ACTIVATIONS
    from neusub.cli import names
    from neusub.cli.analyze import PLOTS
    from neusub.layers import CONNECTIVITIES
    from neusub.models import _MODELS

    def built_in(functions: dict) -> set[str]:  # registered by neusub itself, not by a test
        return {name for name, function in functions.items() if function.__module__.startswith("neusub.")}

    assert set(names.MODELS) == built_in({name: builder for name, (builder, _) in _MODELS.items()})
    assert set(names.ACTIVATIONS) == built_in({name: a.gate for name, a in ACTIVATIONS.items()})
    assert names.CONNECTIVITIES == tuple(CONNECTIVITIES) and names.ANALYSES == tuple(PLOTS)


def test_python_train_names_an_unknown_setting(tmp_path: Path):
    from neusub.cli import train
    from neusub.cli.errors import CLIError

    with pytest.raises(CLIError, match=r"unknown settings \['epoch'\]; did you mean 'epochs'\?") as info:
        train({"epoch": 2, "out": str(tmp_path / "run")})
    assert "\n" not in str(info.value) and not (tmp_path / "run").exists()


def test_python_train_reports_progress(run):
    from neusub.cli.runfolder import epoch_records

    out, said, seen = run
    assert seen == epoch_records(out)  # the callback gets what metrics.jsonl records
    assert "epoch   1  train loss" in said and "epoch   2  train loss" in said  # as the command prints


# ---------------------------------------------------------------------- the cost, said first


def test_train_says_its_cost_first(run):
    _, said, _ = run
    first = said.splitlines()[0]
    assert first.startswith("neusub: training resnet18 (dbb, ns, stochastic 1) on digits, 8 steps: "), said
    assert "deployed); a training step ≈ " in first and "× the plain network's FLOPs at batch 32" in first


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_conversion_report_counts_streams_and_branches():
    model = TwoConvs()
    converted = neusub.convert(model, recipe="conv2", example_input=(1, 3, 8, 8))
    conversion = converted.neusub_conversion
    cost = conversion.cost
    # conv2: two k×k branches. a: 1 stream in → 2 convs; b: 2 streams in → 4 convs of its size
    a, b = 3 * 8 * 9, 8 * 8 * 9  # multiply-adds per output position of each plain conv
    assert cost.multiple(32) == pytest.approx((2 * a + 4 * b) / (a + b), rel=1e-9)
    assert cost.flops_per_step == 0  # no composed branch: nothing is computed once per step
    assert cost.params_plain == sum(p.numel() for p in model.parameters())
    assert cost.params_training == sum(p.numel() for p in converted.parameters())
    assert neusub.training_cost(converted, (3, 8, 8)) == cost  # the public function counts the same
    report = str(pickle.loads(pickle.dumps(converted)).neusub_conversion)  # pickled: the counted cost kept
    assert "training cost (counted from the recipes and stream counts): 1.6k parameters (808 deployed)" in (
        report
    )
    assert f"{cost.multiple(32):.1f}× the plain network's FLOPs at batch 32" in report
    assert not any(value is converted for value in vars(conversion).values())  # no cycle through the model


def test_a_merge_in_cpp_code_is_said_in_words():
    class Hidden(TwoConvs):
        def forward(self, x):
            y = self.a(x)
            with torch._C.DisableTorchFunctionSubclass():  # the op reaches the tensor below torch functions
                y = y * 2.0
            return self.b(y)

    converted = neusub.convert(Hidden(), recipe="repvgg", example_input=(1, 3, 8, 8), on_merge="ignore")
    (path, op, why), *_ = converted.neusub_conversion.merges
    assert op == "mul (in torch's C++ code)" and "aten" not in op + why and "Python API" not in why


# ---------------------------------------------------------------------- files read back


def test_onnx_export_gets_its_suffix_and_reads_back(run, tmp_path: Path, capsys):
    out, _, _ = run
    stem = tmp_path / "digits_q"
    export = ["export", str(out), "--format", "onnx", "--int8", "--calibration-samples", "32"]
    assert main([*export, "--out", str(stem)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_q.int8.onnx", "digits_q.onnx"]
    said = capsys.readouterr().err
    assert f"writing {stem}.onnx: eval and neusub.load know an ONNX file by its suffix" in said
    for name in ("digits_q.onnx", "digits_q.int8.onnx"):
        assert main(["eval", str(tmp_path / name), "--samples", "32", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["samples"] == 32
    assert neusub.load(tmp_path / "digits_q.onnx")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_eval_names_its_own_torchscript_file(run, tmp_path: Path, capsys):
    out, _, _ = run
    scripted = tmp_path / "last.ts.pt"
    assert main(["export", str(out), "--format", "torchscript", "--out", str(scripted)]) == 0
    capsys.readouterr()
    err = cli_fails(capsys, ["eval", scripted], "is a TorchScript file", "torch.jit.load")
    assert "warn" not in err.lower()


def test_resume_blames_files_that_disagree_not_a_flag(run, tmp_path: Path, capsys):
    out, _, _ = run
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(out / "last.pt", mixed / "last.pt")  # a dbb run's checkpoint
    config = json.loads((out / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**config, "recipe": "repvgg"}))  # another run's settings
    err = cli_fails(capsys, ["train", "--resume", "--out", mixed, "--quiet"], "recipe='dbb'", "config.json")
    assert "flag" not in err and "different runs" in err


# ---------------------------------------------------------------------- plots


def _tiny(recipe: str) -> nn.Module:
    return neusub.create_model("resnet18", recipe=recipe, width_mult=0.0625, num_classes=3, stem="cifar")


def test_topology_draws_every_run():
    from neusub.analysis import topology
    from neusub.cli.analyze import PLOTS

    figure = PLOTS["topology"]({"nsnet ns": topology(_tiny("nsnet")), "repvgg ns": topology(_tiny("repvgg"))})
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 2 and titles[0].startswith("nsnet ns:") and titles[1].startswith("repvgg ns:")


def test_kernel_maps_are_compact_on_one_colour_scale():
    from matplotlib.image import AxesImage

    from neusub.analysis import kernel_magnitudes
    from neusub.cli.analyze import PLOTS

    runs = {"dbb ns": {"stages": kernel_magnitudes(_tiny("dbb"))}}
    figure = PLOTS["kernels"](runs)
    images = [a for ax in figure.axes for a in ax.get_children() if isinstance(a, AxesImage)]
    panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
    assert len(figure.axes) - len(panels) == 1  # one colour bar for the figure
    assert len({image.get_clim() for image in images}) == 1  # one scale for every map
    for ax in panels:  # every frame holds a map, or says that there is none
        assert any(isinstance(a, AxesImage) for a in ax.get_children()) or ax.texts[0].get_text() == "none"
    rows = sum(1 + len({b for s in run["stages"].values() for b in s["branches"]}) for run in runs.values())
    assert figure.get_figheight() <= 1.0 * rows + 1  # about an inch a row (it was 2.1)


def test_curves_have_a_title_and_whole_epochs():
    from neusub.cli.plots import curves_figure

    records = [
        {"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.2 / e, "train_acc": 0.3 * e, "val_acc": 0.25 * e}
        for e in (1, 2, 3)
    ]
    figure = curves_figure(records, "run: resnet18 dbb ns+stoch on digits")
    assert figure.get_suptitle() == "run: resnet18 dbb ns+stoch on digits"
    for ax in figure.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_block_drop_names_the_validation_split():
    from neusub.cli.analyze import PLOTS

    blocks = [{"block": "layer1.0", "accuracy": 0.8, "drop": 0.1}]
    figure = PLOTS["block-drop"]({"dbb ns": {"baseline": 0.9, "blocks": blocks}})
    title = figure.axes[0].get_title()
    assert "validation" in title and "test" not in title


def test_ddp_looks_for_unused_parameters_only_where_there_are_some():
    from neusub.cli.distributed import ungraded_parameters

    assert ungraded_parameters(_tiny("repvgg"), (3, 8, 8)) == []  # DDP's find_unused_parameters off
    composed = _tiny("dbb")  # its 1×1 → BN → k×k branches leave the inner BN shift out of the graph
    composed(torch.randn(4, 3, 8, 8)).sum().backward()
    ungraded = [name for name, p in composed.named_parameters() if p.grad is None]
    assert ungraded and ungraded_parameters(composed, (3, 8, 8)) == ungraded


# ---------------------------------------------------------------------- benchmarks


def test_layer_benchmark_leaves_the_recorded_results_alone(monkeypatch):
    root = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(root))
    import layer

    out = layer.parse_args([]).out.resolve()
    assert root / "results" not in out.parents  # a run's numbers go elsewhere unless asked
    assert layer.parse_args(["--out", str(layer.RESULTS)]).out == layer.RESULTS


def test_help_lists_the_choices_and_spells_defaults_as_the_flags_do(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    names = ("resnet18", "mobileone_s0", "mlp_adapter", "nsnet", "qarepvgg", "fashion-mnist", "gelu_tanh")
    for name in names:
        assert name in text
    assert "on | off (off: the paper's ablation, deploy not exact) (default: on)" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "statistics" in capsys.readouterr().out
