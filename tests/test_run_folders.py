"""Run folders that never lose work: refused commands change nothing, stuck runs restart, one
writer per folder, foreign folders are left alone, and bad input is a one-line error."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cli_fails as fails
from helpers import tree_digest

import neusub
from neusub.cli import main
from neusub.cli.checkpoint import finite_json
from neusub.cli.config import load_toml
from neusub.cli.runfolder import RunFolder

TINY = (  # a tiny digits run: its flags
    "--dataset digits --model resnet18 --width-mult 0.0625 --stem cifar --recipe repvgg "
    "--connectivity ns --stochastic 1.0 --train-samples 256 --val-samples 64 --batch-size 64 "
    "--opt adamw --lr 3e-3 --warmup-epochs 0 --quiet"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "finished"
    assert main(["train", *TINY, "--epochs", "1", "--out", str(out)]) == 0
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(run, target)
    return target


@pytest.fixture(scope="module")
def unfinished(run: Path, tmp_path_factory) -> Path:
    """The run as it was before it deployed: its last checkpoint, no results yet."""
    target = tmp_path_factory.mktemp("unfinished") / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("deployed.pt", "curves.png"))
    return target


# ---------------------------------------------------------------------- refused commands


@pytest.mark.parametrize(
    "args, matches",
    [
        (["train", *TINY, "--epochs", "1"], ["already holds a run", "--resume"]),
        (["train", "--resume", "--epochs", "2", "--seed", "5"], ["epochs=2", "seed=5", "cannot change"]),
        (["train", "--resume", "--opt", "adamx"], ["unknown opt 'adamx'"]),
        (["train", "--resume", "--recipe", "dbb"], ["recipe='dbb'", "cannot change"]),
    ],
)
def test_refused_train_leaves_the_run_byte_identical(unfinished: Path, capsys, args, matches):
    before = tree_digest(unfinished)
    fails(capsys, [*args, "--out", unfinished], *matches)
    assert tree_digest(unfinished) == before


@pytest.mark.parametrize(
    "missing",
    [(), ("last.pt",), ("last.pt", "curves.png"), ("config.json",), ("deployed.pt", "+summary.json")],
)
def test_a_finished_run_is_never_trained_again(run: Path, tmp_path: Path, capsys, missing):
    """Whatever was deleted from a finished run (``last.pt`` to save space), ``--resume``
    neither retrains it nor touches a file (``metrics.jsonl`` keeps its lines)."""
    folder = copy_run(run, tmp_path)
    for name in missing:
        if name.startswith("+"):  # what `neusub demo` adds
            (folder / name[1:]).write_text("{}")
        else:
            (folder / name).unlink()
    before = tree_digest(folder)
    for args in (["train", "--resume"], ["train", *TINY, "--epochs", "1"]):
        fails(capsys, [*args, "--out", folder], "already holds a run, finished", f"neusub eval {folder}")
    assert tree_digest(folder) == before


def test_refused_outputs_leave_the_run_byte_identical(run: Path, capsys):
    before = tree_digest(run)
    fails(capsys, ["deploy", run, run / "deployed.pt"], "already exists")
    fails(capsys, ["export", run, "--format", "torchscript", "--out", run / "config.json"], "already exists")
    fails(capsys, ["analyze", run, "--what", "kernels", "--out", run / "config.json"], "is a file")
    assert tree_digest(run) == before


def test_foreign_folder_is_never_written(tmp_path: Path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "deployed.pt").write_bytes(b"someone's model")
    (folder / "metrics.jsonl").write_text("not ours\n")
    before = tree_digest(folder)
    fails(
        capsys, ["train", *TINY, "--epochs", "1", "--out", folder], "not a neusub run", "nothing was written"
    )
    fails(capsys, ["train", "--resume", "--out", folder], "not a neusub run")
    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\ndataset = "digits"\n[[grid]]\nseed = [0]\n')
    fails(capsys, ["experiment", grid, "--out", folder], "holds no experiment", "nothing was written")
    assert tree_digest(folder) == before


# ---------------------------------------------------------------------- one-line errors


@pytest.mark.parametrize(
    "args, match",
    [
        (["--opt", "adamx"], "unknown opt 'adamx'; did you mean 'adamax'? choose one of"),
        (["--seed", "-1"], "--seed=-1 is out of range"),
        (["--seed", str(2**40)], f"--seed={2**40} is out of range"),
        (["--label-smoothing", "1.0"], "--label-smoothing=1.0 is out of range; use a value in [0, 1)"),
        (["--width-mult", "inf"], "--width-mult=inf is not a finite number"),
        (["--width-mult", "1e6"], "--width-mult=1000000.0 is out of range"),
        (["--lr", "nan"], "--lr=nan is not a finite number"),
        (["--batch-size", "1"], "--batch-size=1 is out of range"),
        (["--out", ""], "--out is empty"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, capsys, args, match):
    out = tmp_path / "run"
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", out, *args], match)
    assert not out.exists()


def test_out_paths_that_cannot_be_made(tmp_path: Path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", afile / "run"], "cannot create run folder")
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", afile], "is a file")
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", tmp_path / ("x" * 300)], "use a shorter name")
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", "/proc/neusub-run"], "cannot create run folder")
    assert afile.read_text() == "keep me"


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("null.json", "null", "must hold a table of settings"),
        ("five.json", "5", "must hold a table of settings"),
        ("list.json", "[[1, 2]]", "must hold a table of settings"),
        ("lr.json", '{"lr": "0.1"}', "'lr'='0.1' is a string; it must be a number"),
        ("seed.json", '{"seed": 0.5}', "'seed'=0.5 is a number; it must be an integer"),
        ("amp.json", '{"amp": "false"}', "'amp'='false' is a string; it must be true or false"),
        ("wd.json", '{"weight_decay": "x"}', "it must be a number"),
        ("guided.json", '{"guided": "off"}', "'guided'='off' is a string; it must be true or false"),
        ("date.toml", "lr = 1979-05-27", "'lr'=datetime.date(1979, 5, 27) is a date; it must be a number"),
        ("key.json", '{"learning_rate": 0.1}', "unknown settings ['learning_rate']"),
    ],
)
def test_config_files_of_the_wrong_shape_or_type(tmp_path: Path, capsys, name, text, match):
    config = tmp_path / name
    config.write_text(text)
    fails(capsys, ["train", "--config", config, "--out", tmp_path / "run"], match, str(config))
    assert not (tmp_path / "run").exists()


def test_crafted_checkpoints(run: Path, tmp_path: Path, capsys):
    original = torch.load(run / "last.pt", weights_only=True)

    def crafted(name: str, change) -> Path:
        ckpt = {**original}
        change(ckpt)
        target = tmp_path / name / "last.pt"
        target.parent.mkdir()
        torch.save(ckpt, target)
        shutil.copy(run / "config.json", target.parent / "config.json")
        return target

    fails(capsys, ["eval", crafted("noconfig", lambda c: c.pop("config"))], "lacks 'config'")
    fails(
        capsys,
        ["train", "--resume", "--out", crafted("norng", lambda c: c.pop("rng")).parent],
        "lacks ['rng']",
    )
    wide = crafted("wide", lambda c: c.update(config={**c["config"], "width_mult": 1e6}))
    fails(capsys, ["eval", wide], "width_mult'=1000000.0 is out of range")
    huge = crafted("huge", lambda c: c.update(info={**c["info"], "num_classes": 10**12}))
    fails(capsys, ["eval", huge], "impossible data")
    other = crafted("other", lambda c: c.update(config={**c["config"], "recipe": "dbb"}))
    fails(capsys, ["eval", other], "does not fit the model", "missing", "layer1.0.conv1.branches")
    state = crafted("state", lambda c: c.update(totals="x"))
    fails(capsys, ["train", "--resume", "--out", state.parent], "malformed")


def test_a_flipped_byte_is_detected(run: Path, tmp_path: Path, capsys):
    damaged = tmp_path / "last.pt"
    shutil.copy(run / "last.pt", damaged)
    with zipfile.ZipFile(damaged) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(damaged.read_bytes())
    start = member.header_offset
    name_len, extra_len = struct.unpack("<HH", data[start + 26 : start + 30])  # zip local file header
    data[start + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01  # inside the member's bytes
    damaged.write_bytes(bytes(data))
    fails(capsys, ["eval", damaged], "fails its checksum")


def _write_images(root: Path, channels: int = 3, corrupt: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (12, 12, channels), dtype=np.uint8)).save(
                    folder / f"{i}.png"
                )
    if corrupt:
        (root / "train" / "a" / "0.png").write_bytes(b"\x89PNG not really")
    return root


def test_corrupt_image_names_the_file(tmp_path: Path, capsys):
    images = _write_images(tmp_path / "images", corrupt=True)
    args = ["--dataset", "imagefolder", "--data", images, "--img-size", "12", "--batch-size", "4"]
    fails(capsys, ["train", *TINY, *args, "--epochs", "1", "--out", tmp_path / "run"], "0.png cannot be read")


def test_eval_on_data_of_another_shape(run: Path, tmp_path: Path, capsys):
    images = _write_images(tmp_path / "images")
    fails(
        capsys, ["eval", run, "--dataset", "imagefolder", "--data", images], "takes inputs of shape (1, 8, 8)"
    )


def test_unknown_rand_augment_is_one_line(tmp_path: Path, capsys):
    images = _write_images(tmp_path / "images")
    args = ["--dataset", "imagefolder", "--data", images, "--img-size", "12", "--batch-size", "4"]
    fails(
        capsys,
        ["train", *TINY, *args, "--rand-augment", "bogus", "--epochs", "1", "--out", tmp_path / "run"],
        "--rand-augment='bogus' is not an augmentation timm knows",
        "rand-m9-mstd0.5",
    )
    assert not (tmp_path / "run").exists()


def test_eval_refuses_a_run_folder_holding_another_runs_checkpoint(run: Path, tmp_path: Path, capsys):
    folder = copy_run(run, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dataset": "fashion-mnist"}))
    before = tree_digest(folder)
    for command in (["eval"], ["export", "--format", "torchscript"]):
        fails(
            capsys,
            [command[0], folder, *command[1:]],
            "last.pt belongs to another run than",
            "dataset='digits' in last.pt, 'fashion-mnist' in config.json",
        )
    assert tree_digest(folder) == before


def _empty_split(folder: Path) -> None:
    torch.save(
        {"features": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}, folder / "train.pt"
    )


def _negative_labels(folder: Path) -> None:
    torch.save(
        {"features": torch.zeros(4, 4), "labels": -torch.ones(4, dtype=torch.long)}, folder / "train.pt"
    )


def _pickled_npy(folder: Path) -> None:
    np.save(folder / "train_features.npy", np.array([{"a": 1}] * 4, dtype=object))
    np.save(folder / "train_labels.npy", np.zeros(4, dtype=np.int64))


@pytest.mark.parametrize(
    "write, match",
    [
        (_empty_split, "holds no samples"),
        (_negative_labels, "labels must be class indices >= 0"),
        (_pickled_npy, "allow_pickle=False"),
    ],
)
def test_bad_feature_files(tmp_path: Path, capsys, write, match):
    data = tmp_path / "feats"
    data.mkdir()
    torch.save({"features": torch.randn(8, 4), "labels": torch.arange(8) % 2}, data / "val.pt")
    write(data)
    args = ["train", "--model", "mlp_adapter", "--dataset", "features", "--data", data, "--epochs", "1"]
    fails(capsys, [*args, "--out", tmp_path / "run", "--quiet"], match, "expected layout")


def test_download_without_network(tmp_path: Path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    args = [
        "train",
        *TINY,
        "--dataset",
        "cifar10",
        "--data",
        tmp_path / "cifar",
        "--download",
        "--epochs",
        "1",
    ]
    fails(capsys, [*args, "--out", tmp_path / "run"], "download failed", "name resolution")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- interrupted runs


def _interrupt_at(monkeypatch, step: int, error: type[BaseException] = KeyboardInterrupt) -> None:
    from neusub.cli.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, x, y):
        if self.global_step == step:
            raise error()
        return original(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_ctrl_c_before_the_first_checkpoint_restarts_under_resume(
    run: Path, tmp_path: Path, capsys, monkeypatch
):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 2)
        err = fails(capsys, ["train", *TINY, "--epochs", "1", "--out", out], "stopped at step 2", code=130)
    assert "no checkpoint was written yet" in err and f"--resume --out {out}" in err
    assert (out / "config.json").is_file() and not (out / "last.pt").exists()
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", out], "already holds a run", "--resume")
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    for key, value in torch.load(run / "last.pt", weights_only=True)["model"].items():  # as if never stopped
        assert torch.equal(torch.load(out / "last.pt", weights_only=True)["model"][key], value), key
    assert (out / "metrics.jsonl").read_text().count("\n") == 1


def test_resume_cleans_temp_files_and_records_accepted_changes(tmp_path: Path, capsys, monkeypatch):
    from neusub.cli.errors import Terminated

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _interrupt_at(patch, 3, Terminated)
        fails(
            capsys,
            ["train", *TINY, "--epochs", "1", "--ckpt-steps", "2", "--out", out],
            "stopped at step 3",
            "checkpoint of step 2 is kept",
            code=143,
        )
    leftover = out / ".last.pt.abcd.tmp"
    leftover.write_bytes(b"half a checkpoint")
    assert main(["train", "--resume", "--out", str(out), "--ckpt-steps", "3", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert not leftover.exists() and "removed 1 temporary file" in err and "ckpt_steps 2 -> 3" in err
    assert json.loads((out / "config.json").read_text())["ckpt_steps"] == 3
    assert oct((out / "last.pt").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_second_writer_is_refused(tmp_path: Path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with RunFolder(out).locked():  # another process would hold the same lock
        fails(capsys, ["train", *TINY, "--epochs", "1", "--out", out], "in use by another neusub process")
    assert not any(out.iterdir())


def test_disk_full_keeps_the_last_checkpoint(tmp_path: Path, capsys, monkeypatch):
    import tempfile

    import neusub.files

    real = tempfile.mkstemp
    saves = []

    def mkstemp(prefix="", suffix="", dir=None):
        if prefix.startswith(".last.pt."):
            saves.append(prefix)
            if len(saves) > 1:  # the second checkpoint meets a full disk: its temp file is /dev/full
                name = Path(dir) / f"{prefix}full{suffix}"
                name.symlink_to("/dev/full")
                return os.open(name, os.O_WRONLY), str(name)
        return real(prefix=prefix, suffix=suffix, dir=dir)

    monkeypatch.setattr(neusub.files.tempfile, "mkstemp", mkstemp)
    out = tmp_path / "run"
    fails(
        capsys,
        ["train", *TINY, "--epochs", "1", "--ckpt-steps", "2", "--out", out],
        "the disk is full",
        "last.pt was left as it was",
    )
    assert torch.load(out / "last.pt", weights_only=True)["global_step"] == 2
    assert not list(out.glob(".*.tmp"))


def test_disk_full_messages_name_the_file(tmp_path: Path, capsys, monkeypatch):
    import neusub.cli.trainer

    def full_open(file, mode="r", *args, **kwargs):  # appending to metrics.jsonl meets a full disk
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            return open("/dev/full", "w")
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(neusub.cli.trainer, "open", full_open, raising=False)
    out = tmp_path / "run"
    fails(
        capsys,
        ["train", *TINY, "--epochs", "1", "--out", out],
        "the disk is full",
        str(out / "metrics.jsonl"),
    )


def _diverge_at(monkeypatch, step: int) -> None:
    """The loss of training step ``step`` becomes NaN (as a too high learning rate would make it)."""
    from neusub.cli.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, x, y):
        if self.global_step != step:
            return original(self, x, y)
        loss_fn = self.loss_fn
        self.loss_fn = lambda logits, target: loss_fn(logits, target) * float("nan")
        try:
            return original(self, x, y)
        finally:
            self.loss_fn = loss_fn

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_diverged_run_resumes_from_its_last_checkpoint_at_a_lower_lr(tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        _diverge_at(patch, 5)
        args = ["train", *TINY, "--epochs", "2", "--ckpt-steps", "2", "--out", out]
        err = fails(capsys, args, "the loss became nan at step 5", "the checkpoint of step 4 is kept")
    assert f"`neusub train --resume --out {out} --lr 0.0003`" in err
    first_epoch = (out / "metrics.jsonl").read_text()
    assert first_epoch.count("\n") == 1
    assert main(["train", "--resume", "--out", str(out), "--lr", "0.0003"]) == 0
    assert "lr 0.003 -> 0.0003" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lr"] == 0.0003
    assert (out / "metrics.jsonl").read_text().startswith(first_epoch)
    assert (out / "metrics.jsonl").read_text().count("\n") == 2 and (out / "deployed.pt").is_file()
    scheduler = torch.load(out / "last.pt", weights_only=True)["scheduler"]
    assert set(scheduler["base_values"]) == {0.0003}  # the schedule that ran after the resume


def test_diverging_run_stops_with_a_message_and_valid_json(tmp_path: Path, capsys):
    out = tmp_path / "run"
    err = fails(capsys, ["train", *TINY, "--epochs", "1", "--lr", "1e30", "--ckpt-steps", "1", "--out", out])
    assert "non-finite" in err or "the loss became" in err
    if (out / "last.pt").exists():  # whatever was saved is the last good state
        state = torch.load(out / "last.pt", weights_only=True)["model"]
        assert all(torch.isfinite(t.float()).all() for t in state.values())
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)
    assert json.loads(finite_json({"a": float("nan"), "b": [float("inf"), 1.0]})) == {
        "a": None,
        "b": [None, 1.0],
    }


class _SignalOnWrite:
    """A file object that sends ``signum`` to this process on its third write, then goes on
    writing: the signal's handler runs inside torch's C++ zip writer, as a Ctrl-C can."""

    def __init__(self, handle, signum: int):
        self.handle, self.signum, self.writes = handle, signum, 0

    def write(self, data) -> int:
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), self.signum)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()


def _signal_while_saving(monkeypatch, step: int, signum: int) -> None:
    """The checkpoint of ``step`` is written through :class:`_SignalOnWrite`."""
    real_save = torch.save

    def save(obj, handle, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("global_step") == step:
            handle = _SignalOnWrite(handle, signum)
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def test_a_signal_while_a_checkpoint_is_written(run: Path, tmp_path: Path, capsys, monkeypatch):
    """Ctrl-C during the save of step 2, SIGTERM during that of step 4: each stops the run with its
    one line once the checkpoint is complete, and the resumed run ends as if never stopped."""
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", "1", "--ckpt-steps", "2", "--out", out]
    for step, signum, code in ((2, signal.SIGINT, 130), (4, signal.SIGTERM, 143)):
        with monkeypatch.context() as patch:
            _signal_while_saving(patch, step, signum)
            fails(
                capsys, args, f"stopped at step {step}", f"the checkpoint of step {step} is kept", code=code
            )
        assert torch.load(out / "last.pt", weights_only=True)["global_step"] == step  # complete
        assert not list(out.glob(".*.tmp"))
        args = ["train", "--resume", "--out", out, "--quiet"]
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    for key, value in torch.load(run / "last.pt", weights_only=True)["model"].items():  # as if never stopped
        assert torch.equal(torch.load(out / "last.pt", weights_only=True)["model"][key], value), key


def test_two_deploys_to_one_path_one_is_refused(run: Path, tmp_path: Path, capsys, monkeypatch):
    """The second deploy writes its file while the first is deploying: the first must not replace it."""
    import neusub.cli.commands
    import neusub.cli.trainer

    target, real_deploy, raced = tmp_path / "deployed.pt", neusub.deploy, []

    def deploy(model):
        if not raced:
            raced.append(True)
            assert main(["deploy", str(run), str(target)]) == 0  # the other process, just ahead
        return real_deploy(model)

    for module in (neusub.cli.commands, neusub.cli.trainer):  # where deploy runs before the file is written
        monkeypatch.setattr(module, "deploy", deploy)
    fails(capsys, ["deploy", run, target], "already exists (another process wrote it meanwhile)")
    assert neusub.load(target) is not None and not list(tmp_path.glob(".*.tmp"))


def test_a_failed_int8_export_leaves_no_file(run: Path, tmp_path: Path, capsys, monkeypatch):
    quantization = pytest.importorskip("onnxruntime.quantization")

    def failing(*args, **kwargs):
        raise RuntimeError("the quantizer failed")

    monkeypatch.setattr(quantization, "quantize_static", failing)
    out = tmp_path / "model.onnx"
    args = ["export", run, "--format", "onnx", "--int8", "--calibration-samples", "64", "--out", out]
    fails(capsys, args, "cannot be quantized (the quantizer failed)")
    assert not list(tmp_path.iterdir())


def test_check_equivalence_refuses_non_finite_values():
    layer = neusub.RepConv2d(2, 2, 3, recipe="repvgg")
    with pytest.raises(ValueError, match="example_input holds NaN or inf"):
        neusub.check_equivalence(layer, torch.full((1, 2, 5, 5), float("nan")))
    with torch.no_grad():
        layer.branches["kxk"].weight.fill_(float("inf"))
    with pytest.raises(ValueError, match="output holds NaN or inf on a finite input"):
        neusub.check_equivalence(layer, torch.randn(1, 2, 5, 5))


def test_torch_requirement_excludes_the_weights_only_bypass():
    project = load_toml(Path(__file__).parents[1] / "pyproject.toml")["project"]
    torch_req = next(d for d in project["dependencies"] if d.startswith("torch>="))
    assert tuple(int(v) for v in torch_req.split(">=")[1].split(".")[:2]) >= (2, 6)  # CVE-2025-32434


# ---------------------------------------------------------------------- processes


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "neusub", *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_sigkill_before_the_first_checkpoint_then_resume(run: Path, tmp_path: Path):
    out = tmp_path / "killed"
    proc = _start(["train", *TINY, "--epochs", "1", "--ckpt-steps", "1000", "--out", out])
    _wait_for(out / "config.json", proc)
    proc.kill()
    proc.wait()
    assert not (out / "last.pt").exists(), "the run wrote its checkpoint before it could be killed"
    assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 0  # restarts from scratch
    for key, value in torch.load(run / "last.pt", weights_only=True)["model"].items():
        assert torch.equal(torch.load(out / "last.pt", weights_only=True)["model"][key], value), key


def test_two_processes_one_run_folder(tmp_path: Path, capsys):
    out = tmp_path / "shared"
    first = _start(["train", *TINY, "--epochs", "30", "--ckpt-steps", "1000", "--out", out])
    _wait_for(out / "config.json", first)
    fails(capsys, ["train", "--resume", "--out", out], "in use by another neusub process")
    fails(capsys, ["train", *TINY, "--epochs", "1", "--out", out], "already holds a run")
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 143, err[-2000:]
    assert "neusub: stopped at step" in err and f"--resume --out {out}" in err and "Traceback" not in err


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_experiment_workers_die_with_their_parent(tmp_path: Path):
    grid = tmp_path / "grid.toml"
    grid.write_text(
        '[base]\nmodel = "resnet18"\nwidth_mult = 0.0625\nstem = "cifar"\ndataset = "digits"\n'
        'epochs = 50\nbatch_size = 64\nopt = "adamw"\nwarmup_epochs = 0\nrecipe = "plain"\n'
        "[[grid]]\nseed = [0, 1]\n"
    )
    out = tmp_path / "exp"
    parent = _start(["experiment", grid, "--out", out, "--jobs", "2"])
    for seed in (0, 1):
        _wait_for(out / "runs" / f"seed={seed}" / "config.json", parent, timeout=180)
    workers = [pid for pid in _children(parent.pid) if "spawn" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(workers) >= 2, workers
    parent.kill()
    parent.wait()
    deadline = time.time() + 15
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) for pid in workers):
        assert time.time() < deadline, "experiment workers outlived their parent"
        time.sleep(0.1)
    before = tree_digest(out)
    time.sleep(1.5)
    assert tree_digest(out) == before  # nobody writes there any more


def _state(pid: int) -> str:
    try:
        return {"Z": "zombie"}.get(
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0], "alive"
        )
    except OSError:
        return "zombie"


def test_experiment_results_do_not_depend_on_jobs(tmp_path: Path, capsys, monkeypatch):
    grid = tmp_path / "grid.toml"
    grid.write_text(
        '[base]\nmodel = "resnet18"\nwidth_mult = 0.0625\nstem = "cifar"\ndataset = "digits"\nepochs = 1\n'
        'batch_size = 64\ntrain_samples = 128\nval_samples = 64\nopt = "adamw"\nwarmup_epochs = 0\n'
        'recipe = "repvgg"\n[[grid]]\nseed = [0]\n'
    )
    monkeypatch.setattr(os, "cpu_count", lambda: 4)  # the same on every machine: 4 cores shared by the jobs
    for jobs in (1, 2):
        assert (
            main(["experiment", str(grid), "--out", str(tmp_path / f"jobs{jobs}"), "--jobs", str(jobs)]) == 0
        )
    capsys.readouterr()
    run1, run2 = (tmp_path / f"jobs{jobs}" / "runs" / "seed=0" for jobs in (1, 2))
    result1, result2 = (json.loads((r / "result.json").read_text()) for r in (run1, run2))
    for result in (result1, result2):
        del result["train_seconds"], result["out"]
    assert result1 == result2
    deployed1, deployed2 = (
        torch.load(r / "deployed.pt", weights_only=True)["state_dict"] for r in (run1, run2)
    )
    assert all(torch.equal(deployed1[k], deployed2[k]) for k in deployed1)

    # killed after it deployed, before result.json: evaluated again, not trained again
    (run1 / "result.json").unlink()
    before = tree_digest(run1)
    assert main(["experiment", str(grid), "--out", str(tmp_path / "jobs1")]) == 0
    assert tree_digest(run1) == {**before, "result.json": tree_digest(run1)["result.json"]}
    again = json.loads((run1 / "result.json").read_text())
    assert again["val_acc_deployed"] == result1["val_acc_deployed"] and again["equivalence_error"] < 1e-4
