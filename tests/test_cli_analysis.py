"""``neusub experiment`` and ``neusub analyze`` end to end on digits with tiny models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers import tree_digest

from neusub.cli import main
from neusub.cli.experiment import expand_grid

GRID = """
[base]
model = "resnet18"
width_mult = 0.0625
stem = "cifar"
dataset = "digits"
train_samples = 256
epochs = 1
batch_size = 64
opt = "adamw"
lr = 3e-3
warmup_epochs = 0

[[grid]]
recipe = ["plain", "repvgg"]
setting = [{ connectivity = "block" }, { connectivity = "ns", stochastic = 1.0 }]
seed = [0, 1]

[[grid]]
recipe = ["repvgg"]
setting = [{ connectivity = "ns", stochastic = 1.0, guided = false }]
seed = [0]

[[exclude]]
recipe = "plain"
connectivity = "ns"
"""


def run_cli(*args: str) -> dict:
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(list(args))
    assert code == 0
    text = buffer.getvalue()
    return json.loads(text[text.index("{") :])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("experiment")
    (root / "grid.toml").write_text(GRID)
    run_cli("experiment", str(root / "grid.toml"), "--out", str(root / "out"))
    return root


def test_experiment_runs_the_grid_and_writes_tables(experiment: Path):
    out = experiment / "out"
    rows = list(csv.DictReader((out / "results.csv").open()))
    names = [r["name"] for r in rows]
    assert len(rows) == 7 and len(set(names)) == 7  # (plain: block only) 2 + repvgg 4 + unguided 1
    assert not any("recipe=plain_connectivity=ns" in n for n in names)
    for r in rows:
        assert 0.0 <= float(r["val_acc_deployed"]) <= 1.0
        if r["guided"] == "True":  # guided runs deploy exactly: same accuracy as the training structure
            assert float(r["equivalence_error"]) < 1e-4
            assert r["val_acc_deployed"] == r["val_acc_training"]
    unguided = [r for r in rows if r["guided"] == "False"]
    assert len(unguided) == 1 and float(unguided[0]["equivalence_error"]) > 1e-3
    tables = (out / "tables.md").read_text()
    assert "| recipe | block | ns+stoch | ns+stoch unguided |" in tables
    assert "± " in tables and "(n=1)" in tables  # two seeds: mean ± std; one seed marked
    assert "minus `block`" in tables


def test_experiment_resumes_and_refuses_changed_settings(experiment: Path, capsys):
    out = experiment / "out"
    results = sorted((out / "runs").glob("*/result.json"))
    redo = results[0].parent
    stamps = {p: p.stat().st_mtime_ns for p in results}
    results[0].unlink()
    (redo / "deployed.pt").unlink()
    run_cli("experiment", str(experiment / "grid.toml"), "--out", str(out))
    for p in results[1:]:  # finished runs are skipped, untouched
        assert p.stat().st_mtime_ns == stamps[p]
    redone = json.loads(results[0].read_text())
    assert redone["resumed"] is True  # from its checkpoint, not from scratch

    changed = experiment / "changed.toml"
    changed.write_text(GRID.replace("lr = 3e-3", "lr = 1e-3"))
    assert main(["experiment", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "made with other settings" in err and "'lr'" in err


@pytest.mark.parametrize("what", ["similarity", "kernels", "block-drop", "topology", "statistics"])
def test_analyze_writes_json_and_png_comparing_runs(experiment: Path, tmp_path: Path, what: str):
    runs = sorted(p.parent for p in (experiment / "out" / "runs").glob("*repvgg*seed=0/result.json"))
    result = run_cli("analyze", *map(str, runs), "--what", what, "--out", str(tmp_path), "--samples", "64")
    data = json.loads(Path(result["json"]).read_text())
    assert Path(result["png"]).stat().st_size > 1000
    assert set(data) == {"repvgg block", "repvgg ns+stoch", "repvgg ns+stoch unguided"}
    run = data["repvgg ns+stoch"]
    if what == "similarity":
        assert len(run["layers"]) == 16 and run["layers"][0]["stream"] is not None
        assert all(r["stream"] is None for r in data["repvgg block"]["layers"])
    elif what == "kernels":
        assert set(run["stages"]) == {"layer1", "layer2", "layer3", "layer4"}
    elif what == "block-drop":
        assert len(run["blocks"]) == 5 and 0.0 <= run["baseline"] <= 1.0
    elif what == "statistics":
        for when in ("init", "trained"):
            assert len(run[when]) == 16 and run[when][0]["streams"] == 1
            assert all(b["ratio"] == 1.0 for r in data["repvgg block"][when] for b in r["branches"].values())
        assert any(b["ratio"] != 1.0 for r in run["trained"] for b in r["branches"].values())
    else:
        assert run["totals"]["paths"]["block"] == 16 * 3 - 3  # identity branch dropped where strided


def test_analyze_errors(experiment: Path, capsys):
    run = next((experiment / "out" / "runs").glob("*repvgg*/"))
    assert main(["analyze", str(run), "--what", "colour"]) == 2
    assert "unknown analysis 'colour'" in capsys.readouterr().err
    assert main(["analyze", str(run / "deployed.pt"), "--what", "similarity"]) == 2
    assert "needs the training checkpoint" in capsys.readouterr().err
    plain = next((experiment / "out" / "runs").glob("*plain*/"))
    assert main(["analyze", str(plain), "--what", "kernels"]) == 2
    assert "no re-parameterized k×k conv" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text, match",
    [
        ('[base]\nmodel = "resnet18"\n', "no [grid]"),
        ('[[grid]]\nrecipe = ["dbb"]\nlearning_rate = [0.1]\n', "unknown settings ['learning_rate']"),
        ('[[grid]]\nrecipe = "dbb"\n', "must be a non-empty list"),
        ('[[grid]]\nrecipe = ["fancy"]\n', "unknown recipe"),
        ("[[grid]\n", "not valid TOML"),
        ("[grid]\n", "has no axes"),
        ("[[grid]]\n", "has no axes"),
        ("[[grid]]\nsetting = [{}]\n", "has an empty table"),
        ('[[grid]]\ndata = ["a b", "ab"]\n', "share the folder 'data=ab'"),
        ('[[grid]]\ndata = ["x/y", "x-y"]\n', "share the folder 'data=x-y'"),
        ("[[grid]]\nseed = [0]\n[[exclude]]\nseed = 0\n", "yields no run"),
        ("base = 5\n[[grid]]\nseed = [0]\n", "[base] must be a table"),
        ('[base]\nlr = "fast"\n[[grid]]\nseed = [0]\n', "'lr'='fast' is a string; it must be a number"),
        ('[[grid]]\nlr = ["fast"]\n', "'lr'='fast' is a string"),
        ("[[grid]]\nseed = [0]\n[[exclude]]\nbogus = 1\n", "unknown settings ['bogus']"),
        ("exclude = 5\n[[grid]]\nseed = [0]\n", "[[exclude]] must be tables"),
        ('[[grid]]\nseed = [0]\nout = ["x"]\n', "set by the experiment itself"),
    ],
)
def test_bad_grid_files(tmp_path: Path, capsys, text: str, match: str):  # nothing is created
    grid = tmp_path / "grid.toml"
    grid.write_text(text)
    assert main(["experiment", str(grid), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert match in err and "\n" not in err.strip()
    assert main(["experiment", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_grid_that_yields_no_run_never_deletes_finished_runs(experiment: Path, capsys):
    """An empty [grid] table once became one run named "" whose folder was DIR/runs itself."""
    out = experiment / "out"
    before = tree_digest(out)
    base = GRID[: GRID.index("[[grid]]")]
    for table in ("[grid]\n", "[[grid]]\n"):
        (experiment / "empty.toml").write_text(base + table)
        assert main(["experiment", str(experiment / "empty.toml"), "--out", str(out)]) == 2
        assert "has no axes" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_exclude_may_be_one_table():
    runs, _ = expand_grid({"grid": {"seed": [0, 1, 2]}, "exclude": {"seed": 1}})
    assert [name for name, _ in runs] == ["seed=0", "seed=2"]
