"""Files an adversary (or an accident) hands to neusub: NaN / inf weights, FIFOs and devices,
crafted checkpoints that ask for huge networks, ONNX graphs that loop or ask for unbounded
sizes, and ONNX files with copied neusub metadata around another graph. Each is refused with
one line before anything is written, read without bound, or run."""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch
from helpers import cli_fails as fails
from helpers import tree_digest

from neusub import export
from neusub.cli import main
from neusub.saved import build_model, info_from_dict

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

TINY = (  # a tiny digits run: its flags
    "--dataset digits --model resnet18 --width-mult 0.0625 --stem cifar --recipe repvgg "
    "--connectivity ns --stochastic 1.0 --train-samples 128 --val-samples 64 --batch-size 64 "
    "--opt adamw --lr 3e-3 --warmup-epochs 0 --epochs 1 --quiet"
).split()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run with its ONNX export (``last.onnx``) and torchvision export."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    assert main(["export", str(out), "--format", "onnx"]) == 0
    assert main(["export", str(out), "--format", "torchvision"]) == 0
    return out


def _poisoned(source: Path, target: Path, key: str, value: float = float("nan")) -> Path:
    """A copy of a neusub file with one value of its first conv weight set to ``value``."""
    saved = torch.load(source, weights_only=True)
    state = saved[key]
    name = next(k for k, v in state.items() if v.dim() == 4)
    state[name].view(-1)[0] = value
    torch.save(saved, target)
    return target


def _poisoned_onnx(source: Path, target: Path) -> Path:
    proto = onnx.load(str(source))
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] = float("inf")
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(proto, str(target))
    return target


# ---------------------------------------------------------------------- NaN / inf weights


def test_non_finite_weights_are_refused_before_anything_is_written(run: Path, tmp_path: Path, capsys):
    checkpoint = _poisoned(run / "last.pt", tmp_path / "last.pt", "model")
    deployed = _poisoned(run / "deployed.pt", tmp_path / "deployed.pt", "state_dict", float("inf"))
    torchvision = _poisoned(run / "last.tv.pt", tmp_path / "last.tv.pt", "state_dict")
    onnx_file = _poisoned_onnx(run / "last.onnx", tmp_path / "last.onnx")
    before = tree_digest(tmp_path)
    for file in (checkpoint, deployed, torchvision, onnx_file):
        fails(capsys, ["eval", file], "non-finite", "NaN or inf", str(file))
    fails(capsys, ["deploy", checkpoint, tmp_path / "out.pt"], "non-finite")
    for fmt in ("torchscript", "torchvision", "onnx"):
        fails(capsys, ["export", checkpoint, "--format", fmt, "--out", tmp_path / f"x.{fmt}"], "non-finite")
    fails(capsys, ["analyze", checkpoint, "--what", "statistics", "--out", tmp_path / "an"], "non-finite")
    assert tree_digest(tmp_path) == before  # nothing written

    # finite weights whose outputs overflow: eval reports no success either
    huge = torch.load(run / "deployed.pt", weights_only=True)
    huge["state_dict"]["fc.weight"] *= 1e38
    torch.save(huge, tmp_path / "huge.pt")
    fails(capsys, ["eval", tmp_path / "huge.pt"], "outputs NaN or inf")


# ---------------------------------------------------------------------- what is read, and how much


class _Fifo:
    """A FIFO at ``path``; if anything opens it for reading, a writer gives it a few bytes and
    closes (so that code that reads FIFOs fails instead of hanging)."""

    def __init__(self, path: Path):
        os.mkfifo(path)
        self.path, self.stop = path, threading.Event()
        threading.Thread(target=self._feed, daemon=True).start()

    def _feed(self) -> None:
        while not self.stop.wait(0.05):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader
            except OSError:
                continue
            os.write(fd, b"not a model")
            os.close(fd)


def test_fifos_devices_and_giant_files_are_never_read(run: Path, tmp_path: Path, capsys):
    fifos = [_Fifo(tmp_path / name) for name in ("fifo.pt", "fifo.onnx", "fifo.json")]
    try:
        fails(capsys, ["eval", tmp_path / "fifo.pt"], "is a FIFO (named pipe), not a regular file")
        fails(capsys, ["eval", tmp_path / "fifo.onnx"], "is a FIFO (named pipe), not a regular file")
        fails(capsys, ["train", "--config", tmp_path / "fifo.json", "--out", tmp_path / "r"], "is a FIFO")
    finally:
        for fifo in fifos:
            fifo.stop.set()
    for name in ("null.pt", "null.onnx"):  # like /dev/zero, without reading forever on failure
        (tmp_path / name).symlink_to("/dev/null")
        fails(capsys, ["eval", tmp_path / name], "is a character device")
    giant = tmp_path / "giant.onnx"
    with open(giant, "wb") as handle:  # sparse: 3 GB that take no disk space
        handle.truncate(3 * 10**9)
    fails(capsys, ["eval", giant], "is 3 GB, over the 2.15 GB allowed for ONNX files")
    assert not (tmp_path / "r").exists()


def _peak_rss_increase(call) -> float:
    """Bytes the peak resident memory of this process grew by during ``call()`` (Linux)."""

    def peak() -> int:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from the current use
    start = peak()
    call()
    return peak() - start


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures memory through /proc")
def test_crafted_checkpoints_build_nothing_large(run: Path, tmp_path: Path, capsys):
    """A 3 kB file whose settings ask for a network of 0.8 GB is refused before that is built."""
    original = torch.load(run / "last.pt", weights_only=True)
    wide = {"format": original["format"], "info": original["info"]}
    wide["config"] = {**original["config"], "width_mult": 4.0}
    with torch.device("meta"):  # the training structure those settings describe: sizes only
        model = build_model(wide["config"], info_from_dict(original["info"], "info"))
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert size > 0.7e9
    empty = tmp_path / "empty.pt"
    torch.save({**wide, "model": {}}, empty)
    broadcast = tmp_path / "broadcast.pt"  # every weight a stride-0 view of one stored value
    views = {k: torch.zeros((), dtype=t.dtype).expand(t.shape) for k, t in model.state_dict().items()}
    torch.save({**wide, "model": views}, broadcast)
    assert empty.stat().st_size < 10_000 and broadcast.stat().st_size < 200_000
    with torch.device("meta"):
        torch.nn.Linear(2, 2)  # the meta kernels load once per process: not part of what is measured
    grew = _peak_rss_increase(lambda: fails(capsys, ["eval", empty], "does not fit", "138 missing"))
    assert grew < 0.25 * size, f"{grew / 1e9:.2f} GB for a refused file"
    grew = _peak_rss_increase(lambda: fails(capsys, ["eval", broadcast], "broadcast views"))
    assert grew < 0.25 * size, f"{grew / 1e9:.2f} GB for a refused file"


# ---------------------------------------------------------------------- ONNX graphs


def _value(name: str, shape: list, elem: int = TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _tensor(name: str, dims: list[int], value: float = 0.0, elem: int = TensorProto.FLOAT):
    count = 1
    for d in dims:
        count *= d
    return helper.make_tensor(name, elem, dims, [value] * count)


def _model(nodes: list, inputs: list, outputs: list, initializers: list = (), metadata: dict | None = None):
    graph = helper.make_graph(nodes, "crafted", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    helper.set_model_props(proto, metadata or {})
    return proto


SAMPLE = ["batch", 1, 8, 8]  # what the tiny digits run takes


def _linear_head(source: str = "input", weight: str = "w") -> list:
    """Flatten, then a matrix product with ``weight``: ``output``."""
    return [
        helper.make_node("Flatten", [source], ["flat"]),
        helper.make_node("MatMul", ["flat", weight], ["output"]),
    ]


def _endless_loop():
    body = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["c_out"]), helper.make_node("Identity", ["x"], ["x_out"])],
        "body",
        [_value("i", [], TensorProto.INT64), _value("c", [], TensorProto.BOOL), _value("x", SAMPLE)],
        [_value("c_out", [], TensorProto.BOOL), _value("x_out", SAMPLE)],
    )
    loop = helper.make_node("Loop", ["trips", "always", "input"], ["looped"], body=body)
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [2**62])
    always = helper.make_tensor("always", TensorProto.BOOL, [], [True])
    weights = [trips, always, _tensor("w", [64, 10])]
    return [loop, *_linear_head("looped")], weights, ["batch", 10], "not bounded by its shapes (Loop)"


def _huge_constant():
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [1, 2**31])
    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["big"]),
        helper.make_node("Add", ["big", "big"], ["output"]),
    ]
    return nodes, [shape], [1, 2**31], "asks for 2,147,483,648 elements"


def _huge_window():
    pool = helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[5000, 5000], pads=[4999] * 4)
    nodes = [pool, helper.make_node("ReduceMean", ["pooled"], ["output"], keepdims=0)]
    return nodes, [], [], "operations per sample"


def _external_weights():
    weight = _tensor("w", [64, 10])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "zeros.bin"), ("length", str(4 * 640))):
        weight.external_data.add(key=key, value=value)
    return _linear_head(), [weight], ["batch", 10], "external"


@pytest.mark.parametrize("make", [_endless_loop, _huge_constant, _huge_window, _external_weights])
def test_onnx_files_of_unbounded_cost_are_never_run(run: Path, tmp_path: Path, capsys, make):
    nodes, initializers, output_shape, match = make()
    (tmp_path / "zeros.bin").write_bytes(bytes(4 * 640))
    metadata = export.OnnxModel(run / "last.onnx").metadata
    path = tmp_path / "crafted.onnx"
    proto = _model(nodes, [_value("input", SAMPLE)], [_value("output", output_shape)], initializers, metadata)
    onnx.save(proto, path)
    with pytest.raises(ValueError, match=re.escape(match)):
        export.OnnxModel(path)
    fails(capsys, ["eval", path], match, "nothing was run")


# ---------------------------------------------------------------------- foreign graphs, copied metadata


def _foreign(case: str):
    """``(nodes, inputs, outputs, initializers)`` of a graph that is not the run's network."""
    x, w = _value("input", SAMPLE), _tensor("w", [64, 10])
    logits = _value("output", ["batch", 10])
    head = _linear_head()
    if case == "other input shape":
        wide = [_tensor("w3", [3072, 10])]
        return _linear_head(weight="w3"), [_value("input", ["batch", 3, 32, 32])], [logits], wide
    if case == "fewer classes":
        return _linear_head(weight="w5"), [x], [_value("output", ["batch", 5])], [_tensor("w5", [64, 5])]
    if case == "two inputs":
        add = helper.make_node("Add", ["output0", "other"], ["output"])
        nodes = [head[0], helper.make_node("MatMul", ["flat", "w"], ["output0"]), add]
        return nodes, [x, _value("other", ["batch", 10])], [logits], [w]
    if case == "integer input":
        cast = helper.make_node("Cast", ["input"], ["as_float"], to=TensorProto.FLOAT)
        return [cast, *_linear_head("as_float")], [_value("input", SAMPLE, TensorProto.INT64)], [logits], [w]
    if case == "integer output":
        cast = helper.make_node("Cast", ["float_logits"], ["output"], to=TensorProto.INT64)
        nodes = [head[0], helper.make_node("MatMul", ["flat", "w"], ["float_logits"]), cast]
        return nodes, [x], [_value("output", ["batch", 10], TensorProto.INT64)], [w]
    if case == "image output":
        return [helper.make_node("Identity", ["input"], ["output"])], [x], [_value("output", SAMPLE)], []
    if case == "fixed batch":
        return head, [_value("input", [1, 1, 8, 8])], [_value("output", [1, 10])], [w]
    if case == "no input":
        constant = helper.make_node("Constant", [], ["output"], value=_tensor("v", [1, 10]))
        return [constant], [], [_value("output", [1, 10])], []
    if case == "double input":
        return (
            _linear_head(weight="wd"),
            [_value("input", SAMPLE, TensorProto.DOUBLE)],
            [_value("output", ["batch", 10], TensorProto.DOUBLE)],
            [_tensor("wd", [64, 10], elem=TensorProto.DOUBLE)],
        )
    # "scalar first output": a sum first, the logits second
    total = helper.make_node("ReduceSum", ["flat"], ["output"], keepdims=0)
    nodes = [head[0], total, helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    return nodes, [x], [_value("output", []), _value("logits", ["batch", 10])], [w]


FOREIGN = [
    ("other input shape", "takes ('batch', 3, 32, 32)"),
    ("fewer classes", "of shape (1, 5) per sample"),
    ("two inputs", "has 2 inputs"),
    ("integer input", "takes tensor(int64) inputs"),
    ("integer output", "gives tensor(int64)"),
    ("image output", "of shape (1, 1, 8, 8) per sample"),
    ("fixed batch", "takes (1, 1, 8, 8)"),
    ("no input", "has 0 inputs"),
    ("double input", "takes tensor(double) inputs"),
    ("scalar first output", "of shape () per sample"),
]


@pytest.mark.parametrize("case, match", FOREIGN)
def test_foreign_graph_with_copied_metadata_is_one_line(run: Path, tmp_path: Path, capsys, case, match):
    nodes, inputs, outputs, initializers = _foreign(case)
    metadata = export.OnnxModel(run / "last.onnx").metadata
    path = tmp_path / "foreign.onnx"
    onnx.save(_model(nodes, inputs, outputs, initializers, metadata), path)
    fails(capsys, ["eval", path], match)


def test_to_onnx_int8_raises_value_error_on_every_bad_input(run: Path, tmp_path: Path):
    good, out = run / "last.onnx", tmp_path / "int8.onnx"
    x = torch.randn(8, 1, 8, 8)
    (tmp_path / "garbage.onnx").write_bytes(b"not a model at all")
    for case in ("two inputs", "integer input", "no input"):
        nodes, inputs, outputs, initializers = _foreign(case)
        onnx.save(_model(nodes, inputs, outputs, initializers), tmp_path / f"{case}.onnx")
    _poisoned_onnx(good, tmp_path / "nan.onnx")
    quantized = export.to_onnx_int8(good, tmp_path / "quantized.onnx", x)
    shutil.copy(good, tmp_path / "same.onnx")
    bad = [
        (tmp_path / "missing.onnx", x, "does not exist"),
        (tmp_path / "garbage.onnx", x, "not an ONNX model"),
        (tmp_path, x, "is a folder"),
        (tmp_path / "two inputs.onnx", x, "has 2 inputs"),
        (tmp_path / "integer input.onnx", x, "takes tensor(int64) inputs"),
        (tmp_path / "no input.onnx", x, "has 0 inputs"),
        (tmp_path / "nan.onnx", x, "holds NaN or inf"),
        (quantized, x, "quantized already"),
        (good, torch.randn(4, 3, 8, 8), "has shape (4, 3, 8, 8); the network takes (N, 1, 8, 8)"),
        (good, torch.randn(64), "has shape (64,)"),
        (good, [x.numpy()], "is of type ndarray, not a torch tensor"),
        (good, 5, "not int"),
        (good, torch.full((4, 1, 8, 8), float("nan")), "holds NaN or inf"),
        (good, x[:0], "at least one calibration sample"),
    ]
    for source, calibration, match in bad:
        with pytest.raises(ValueError, match=re.escape(match)):
            export.to_onnx_int8(source, out, calibration)
    with pytest.raises(ValueError, match="is not a folder"):
        export.to_onnx_int8(good, tmp_path / "none" / "int8.onnx", x)
    with pytest.raises(ValueError, match="is the float file itself"):
        export.to_onnx_int8(tmp_path / "same.onnx", tmp_path / "same.onnx", x)
    with pytest.raises(ValueError, match="unknown calibration method"):
        export.to_onnx_int8(good, out, x, method="best")
    assert not out.exists()
