"""A newcomer's first hour: defaults that fit the dataset, warnings for runs too short to learn,
saved models that load with ``neusub.load``, a command line that starts fast, eval that is quick."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neusub
from neusub.cli import main
from neusub.cli.config import PRESETS, build_config

TINY = (  # a tiny digits run: its flags
    "--dataset digits --model resnet18 --width-mult 0.0625 --recipe repvgg --train-samples 256 "
    "--val-samples 64 --batch-size 64 --epochs 1 --quiet"
).split()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("newcomer") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def test_small_datasets_get_no_paper_preset():
    for dataset in ("fashion-mnist", "digits", "cifar10"):
        cfg = build_config({}, {"dataset": dataset})
        assert cfg.preset is None and cfg.batch_size == 128 and cfg.opt == "adamw" and cfg.epochs == 10
        assert cfg.warmup_epochs == 0 and cfg.drop_path == 0.0 and cfg.auto_augment is None
    paper = build_config({}, {})  # the default dataset, cifar100, keeps the paper's recipe
    assert paper.preset == "cifar100" and paper.batch_size == PRESETS["cifar100"]["batch_size"]
    asked = build_config({}, {"dataset": "fashion-mnist", "preset": "cifar100", "batch_size": 64})
    assert asked.preset == "cifar100" and asked.opt == "lamb" and asked.batch_size == 64  # flags win
    assert build_config({}, {"dataset": "features"}).preset == "vlm"


def test_train_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--epochs EPOCHS training epochs (default: 10)", "(default: adamw)", "(default: 128)"):
        assert shown in text


def test_config_json_records_what_ran(run: Path):
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] is None and saved["auto_augment"] is None and saved["epochs"] == 1


def test_train_is_a_function_for_notebooks(tmp_path: Path):
    from neusub.cli import TrainConfig, train

    options = {"dataset": "digits", "model": "resnet18", "width_mult": 0.0625, "recipe": "repvgg"}
    options |= {"train_samples": 256, "val_samples": 64, "batch_size": 64, "epochs": 1}
    record = train({**options, "out": str(tmp_path / "from_dict")})
    assert record["epoch"] == 1 and record["equivalence_error"] < 1e-4
    again = train(TrainConfig(**options, out=str(tmp_path / "from_config")))
    assert again["val_acc"] == record["val_acc"]  # the same run, seeded alike
    assert neusub.load(tmp_path / "from_config" / "deployed.pt") is not None


def test_every_create_model_option_is_a_train_option():
    import inspect

    from neusub.cli.config import TrainConfig
    from neusub.saved import DATA_MODEL_OPTIONS, RENAMED_MODEL_OPTIONS, model_options

    names = set(inspect.signature(neusub.create_model).parameters) - set(DATA_MODEL_OPTIONS)
    fields = set(TrainConfig.__dataclass_fields__)
    assert {RENAMED_MODEL_OPTIONS.get(n, n) for n in names} <= fields
    cfg = TrainConfig(recompute=True, width_mult=0.5, drop_path=0.1)
    options = model_options(cfg)
    assert options["recompute"] is True and options["width_mult"] == 0.5 and options["drop_path_rate"] == 0.1


def test_short_runs_warn(tmp_path: Path, capsys):
    args = ["train", *TINY, "--warmup-epochs", "1", "--out", str(tmp_path / "short")]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "warning: the warm-up (1 epochs) is as long as the run (1)" in err
    assert "warning: only 4 optimizer steps" in err


def test_load_every_saved_file(run: Path, tmp_path: Path, capsys):
    x = torch.randn(3, 1, 8, 8)
    trained = neusub.load(run)
    assert isinstance(trained, torch.nn.Module) and not trained.training
    deployed = neusub.load(run / "deployed.pt")
    assert main(["export", str(run), "--format", "torchvision", "--out", str(tmp_path / "m.tv.pt")]) == 0
    tv = neusub.load(tmp_path / "m.tv.pt")
    import torchvision

    assert isinstance(tv, torchvision.models.ResNet)
    with torch.no_grad():
        expected = trained(x)
        for other in (deployed, tv):
            assert float((other(x) - expected).abs().max() / expected.abs().max()) <= 1e-5
    capsys.readouterr()
    with pytest.raises(ValueError, match="does not exist"):
        neusub.load(tmp_path / "missing.pt")
    saved = torch.load(run / "deployed.pt", weights_only=True)
    crafted = {  # each a file neusub.load refuses with a sentence, not a traceback from deep inside
        "no_info": ({k: v for k, v in saved.items() if k != "info"}, "lacks 'info'"),
        "huge": ({**saved, "info": {**saved["info"], "num_classes": 10**9}}, "describes impossible data"),
        "wider": ({**saved, "config": {**saved["config"], "width_mult": 2.0}}, "does not fit the model"),
        "bad_model": ({**saved, "config": {**saved["config"], "model": "nope"}}, "unknown model 'nope'"),
    }
    for name, (content, message) in crafted.items():
        torch.save(content, tmp_path / f"{name}.pt")
        with pytest.raises(ValueError, match=message):
            neusub.load(tmp_path / f"{name}.pt")


def test_the_command_line_starts_without_torch():
    code = "import sys, neusub.cli as c; c.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "neusub", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - start < 2.0  # was ~11 s when timm and torchvision loaded first


# Run with the command line's packages made unimportable (a library-only install; tqdm is
# also a dependency of timm's huggingface_hub, so the library test leaves it importable).
WITHOUT_CLI_PACKAGES = "import sys\nfor name in {names}:\n    sys.modules[name] = None\n"


def test_the_library_needs_no_command_line_package():
    code = WITHOUT_CLI_PACKAGES.format(names=("matplotlib", "sklearn")) + (
        "import torch, torchvision, neusub\n"
        "m = neusub.create_model('resnet18', width_mult=0.0625, num_classes=3, stem='cifar')\n"
        "m(torch.randn(2, 3, 8, 8)).sum().backward()\n"
        "c = neusub.convert(torchvision.models.mobilenet_v2(weights=None, num_classes=3), recipe='repvgg')\n"
        "err = neusub.check_equivalence(m, torch.randn(2, 3, 8, 8))\n"
        "import neusub.analysis, neusub.export\n"
        "print(err < 1e-4, sorted(n for n in ('matplotlib', 'sklearn') if sys.modules.get(n)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True []"


def test_load_is_library_code(run: Path):
    """``neusub.load`` reads the command line's files without the command line (or its extra)."""
    code = WITHOUT_CLI_PACKAGES.format(names=("matplotlib", "sklearn")) + (
        "import neusub, torch\n"
        f"models = [neusub.load({str(run)!r}), neusub.load({str(run / 'deployed.pt')!r})]\n"
        "y = [m(torch.randn(2, 1, 8, 8)) for m in models]\n"
        "print(sorted(n for n in sys.modules if n.startswith('neusub.cli')), y[0].shape == y[1].shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[] True"


def test_no_library_module_imports_the_command_line():
    import ast

    root = Path(neusub.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if "cli" in path.relative_to(root).parts or path.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = "." * node.level + (node.module or "")
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.lstrip(".").split(".")[0] == "cli" or n.startswith("neusub.cli") for n in names):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert offenders == []


def test_the_command_line_names_the_missing_extra():
    code = WITHOUT_CLI_PACKAGES.format(names=("matplotlib", "tqdm", "sklearn"))
    code += "from neusub.cli import main\nsys.exit(main(['demo']))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "neusub: error: the command line needs matplotlib, tqdm, scikit-learn (the 'cli' extra); "
        "install it with: pip install 'neusub[cli]'"
    )


def test_timm_sees_neusub_models_whichever_is_imported_first():
    for code in ("import neusub, timm", "import timm, neusub"):
        check = f"{code}; print(timm.create_model('neusub_resnet18', width_mult=0.0625).__class__.__name__)"
        out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "ResNet", code


def test_models_registered_later_reach_timm():
    import timm

    from neusub.models import register_model
    from neusub.models.mlp_adapter import build_mlp_adapter

    register_model("late_adapter", build_mlp_adapter)
    assert "neusub_late_adapter" in timm.list_models("neusub_*")


def test_eval_is_deployed_by_default_with_samples(run: Path, capsys):
    assert main(["eval", str(run), "--samples", "50"]) == 0
    fast = json.loads(capsys.readouterr().out)
    assert fast["model"] == "deployed" and fast["samples"] == 50
    assert main(["eval", str(run), "--samples", "50", "--training-structure"]) == 0
    slow = json.loads(capsys.readouterr().out)
    assert slow["model"] == "training structure" and slow["val_acc"] == fast["val_acc"]
    assert slow["val_loss"] == pytest.approx(fast["val_loss"], rel=1e-5)
    assert main(["eval", str(run), "--samples", "-1"]) == 2
