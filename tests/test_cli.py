"""The CLI end to end on tiny data: demo, train, resume after SIGKILL, DDP, eval, deploy, export, errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import cli_fails as _fails
from helpers import tree_digest

from neusub.cli import main

TINY = (  # a tiny digits run: its flags
    "--dataset digits --model resnet18 --width-mult 0.125 --stem cifar --recipe nsnet "
    "--connectivity ns --stochastic 1.0 --neural-drop 0.1 --opt adamw --lr 3e-3 --warmup-epochs "
    "1 --batch-size 128 --quiet"
).split()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def neusub(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``neusub ARGS`` in this process (imports already paid for): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "full"
    neusub("train", *TINY, "--epochs", "2", "--ckpt-steps", "3", "--out", str(out))
    return out


def test_train_writes_a_complete_run_folder(finished_run: Path):
    for name in ("config.json", "metrics.jsonl", "last.pt", "deployed.pt", "curves.png"):
        assert (finished_run / name).is_file(), name
    config = json.loads((finished_run / "config.json").read_text())
    assert config["recipe"] == "nsnet" and config["stochastic"] == 1.0 and config["epochs"] == 2
    records = [json.loads(line) for line in (finished_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in records)


def test_resume_after_sigkill_is_bit_identical(finished_run: Path, tmp_path: Path):
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "neusub",
        "train",
        *TINY,
        "--epochs",
        "2",
        "--ckpt-steps",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere after the first checkpoint, inside the first epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "deployed.pt").exists(), "the run finished before it could be killed"
    step_at_kill = torch.load(out / "last.pt", weights_only=True)["global_step"]
    assert 0 < step_at_kill < 2 * 12
    neusub("train", "--resume", "--out", str(out), "--quiet")
    resumed, reference = weights(out / "last.pt"), weights(finished_run / "last.pt")
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key

    def records(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in lines]

    assert records(out) == records(finished_run)  # no line lost or logged twice across the kill


def test_eval_deploy_export(finished_run: Path, tmp_path: Path):
    result = json.loads(neusub("eval", str(finished_run)).stdout)
    deployed_eval = json.loads(neusub("eval", str(finished_run / "deployed.pt")).stdout)
    assert deployed_eval["model"] == "deployed" and result["val_acc"] == pytest.approx(
        deployed_eval["val_acc"], abs=1e-9
    )

    report = json.loads(neusub("deploy", str(finished_run / "last.pt"), str(tmp_path / "plain.pt")).stdout)
    assert report["equivalence_error"] < 1e-5
    assert report["params_deployed"] < report["params_training"]

    ts = json.loads(
        neusub("export", str(finished_run), "--format", "torchscript", "--out", str(tmp_path / "m.ts")).stdout
    )
    scripted = torch.jit.load(ts["out"])
    x = torch.randn(2, 1, 8, 8)
    plain = torch.load(tmp_path / "plain.pt", weights_only=True)
    assert plain["format"] == "neusub-deployed-v1"
    from neusub.cli.commands import load_run_model

    model, *_ = load_run_model(str(finished_run))
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), rtol=1e-4, atol=1e-5)
    tv = neusub("export", str(finished_run), "--format", "torchvision", "--out", str(tmp_path / "m.tv.pt"))
    assert Path(json.loads(tv.stdout)["out"]).is_file()


def test_demo_fast(tmp_path: Path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path / "demo")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["val_acc_training_structure"] == summary["val_acc_deployed"]
    assert summary["equivalence_error"] < 1e-5
    assert summary["params_deployed"] < summary["params_training"]
    for name in ("config.json", "metrics.jsonl", "last.pt", "deployed.pt", "curves.png", "summary.json"):
        assert (tmp_path / "demo" / name).is_file(), name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_cpu_processes_identical_and_resumable(tmp_path: Path):
    out = tmp_path / "ddp"
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "neusub",
        "train",
        *TINY,
        "--epochs",
        "2",
        "--ckpt-steps",
        "2",
        "--out",
        str(out),
    ]
    first = subprocess.run([*base, "--stop-after", "4"], env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["global_step"] == 4
    resumed = subprocess.run(
        [*base[:-2], "--out", str(out), "--resume"], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for said in (first.stderr, resumed.stderr):  # find_unused_parameters set as needed; no spurious strides
        assert "find_unused_parameters" not in said and "Grad strides" not in said, said[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert all(r["ranks_identical"] for r in records)
    assert (out / "deployed.pt").is_file()


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "args, match",
    [
        (["--model", "resnet7"], "unknown model"),
        (["--recipe", "fancy"], "unknown recipe"),
        (["--preset", "mnist"], "unknown preset"),
        (["--dataset", "svhn"], "unknown dataset"),
        (["--connectivity", "dense"], "unknown connectivity"),
        (["--stochastic", "1.5"], "out of range"),
        (["--epochs", "0"], "out of range"),
        (["--train-samples", "-5"], "out of range"),
        (["--dataset", "cifar10", "--data", "/nonexistent"], "expected layout"),
        (["--dataset", "fashion-mnist", "--data", "/nonexistent"], "expected layout"),
        (["--dataset", "features"], "expected layout"),
    ],
)
def test_bad_train_input_is_one_line_exit_2(capsys, tmp_path: Path, args: list[str], match: str):
    base = ["train", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]
    _fails(capsys, base + args, match)
    assert not (tmp_path / "run" / "config.json").exists()


def test_existing_run_is_never_overwritten(capsys, finished_run: Path):
    before = tree_digest(finished_run)
    _fails(capsys, ["train", *TINY, "--epochs", "1", "--out", str(finished_run)], "--resume")
    _fails(capsys, ["deploy", str(finished_run), str(finished_run / "deployed.pt")], "already exists")
    _fails(
        capsys, ["train", "--resume", "--out", str(finished_run), "--recipe", "dbb", "--quiet"], "finished"
    )
    assert tree_digest(finished_run) == before


def test_bad_checkpoints(capsys, tmp_path: Path, finished_run: Path):
    _fails(capsys, ["eval", str(tmp_path / "missing.pt")], "does not exist")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((finished_run / "last.pt").read_bytes()[:5000])
    _fails(capsys, ["eval", str(truncated)], "truncated")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    _fails(capsys, ["deploy", str(foreign), str(tmp_path / "x.pt")], "not a neusub")
    _fails(capsys, ["export", str(finished_run), "--format", "tflite"], "unknown export format")
    _fails(capsys, ["train", "--resume", "--out", str(tmp_path / "nothing"), "--quiet"], "does not exist")
