"""The paper's claims, tested on an experiment's ``results.csv`` (paired by model, recipe and seed).

    python experiments/claims.py runs/fashion_mnist/results.csv
    python experiments/claims.py A.csv B.csv ...   # one row per experiment and comparison, pooled

For each comparison: the mean difference in deployed validation accuracy (points), its
standard error over the (recipe, seed) pairs, how many pairs went each way, and a
two-sided sign-test p-value; then the guided-activation ablation, if the grid has it, and
the final training loss per setting (from each run's metrics.jsonl). Prints markdown.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def setting(row: dict) -> str:
    """``block`` / ``ns+stoch`` / ``ns+stoch unguided``: the label without the recipe."""
    return row["label"].split(" ", 1)[1]


def summary(label: str, diffs: list[float]) -> str:
    if not diffs:
        return f"| {label} | — | — | — | — |"
    mean = statistics.fmean(diffs)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return (
        f"| {label} | {mean:+.2f} ± {sem:.2f} | {len(diffs)} | {wins} / {losses} "
        f"| {sign_test(wins, losses):.2f} |"
    )


def paired(runs: dict, better: str, worse: str, baseline_recipe: str | None = None) -> list[float]:
    """Deployed-accuracy differences (points) of ``better`` minus ``worse``, paired by model,
    recipe and seed over the multi-branch recipes; with ``baseline_recipe`` the ``worse``
    side is that recipe (e.g. ``plain``) of the same model and seed."""
    diffs = []
    for (model, recipe, chosen, seed), row in runs.items():
        if chosen != better or recipe == "plain":
            continue
        other = runs.get((model, baseline_recipe or recipe, worse, seed))
        if other is not None:
            diffs.append(100 * (float(row["val_acc_deployed"]) - float(other["val_acc_deployed"])))
    return diffs


def final_losses(path: Path, rows: list[dict]) -> list[str]:
    """Mean final training loss (last epoch) per model, recipe and setting, from metrics.jsonl."""
    losses: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    epochs: set[int] = set()
    for r in rows:
        metrics = path.parent / "runs" / r["name"] / "metrics.jsonl"
        if not metrics.exists():
            continue
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        last = [rec for rec in records if "epoch" in rec][-1]
        epochs.add(last["epoch"])
        losses[(r["model"], r["recipe"], setting(r))].append(last["train_loss"])
    if not losses:
        return []
    out = [
        "",
        f"Final training loss (mean over the last epoch's steps; epochs: {sorted(epochs)}):",
        "",
        "| model | recipe | setting | train loss | runs |",
        "|---|---|---|--:|--:|",
    ]
    for (model, recipe, chosen), values in losses.items():
        out.append(f"| {model} | {recipe} | {chosen} | {statistics.fmean(values):.4f} | {len(values)} |")
    return out


COMPARISONS = {  # label: (better, worse, baseline recipe)
    "ns − block": ("ns", "block", None),
    "ns+stoch − block": ("ns+stoch", "block", None),
    "ns+stoch − ns": ("ns+stoch", "ns", None),
    "block − plain": ("block", "block", "plain"),
    "ns+stoch − plain": ("ns+stoch", "block", "plain"),
}


def load(path: str) -> dict:
    return {(r["model"], r["recipe"], setting(r), r["seed"]): r for r in csv.DictReader(open(path))}


def experiment_name(path: str) -> str:
    """``runs/mlp/results.csv`` → ``mlp``; ``docs/mlp_results.csv`` → ``mlp_results``."""
    p = Path(path)
    return p.parent.name if p.stem == "results" else p.stem


def verdicts(paths: list[str]) -> None:
    """Each comparison on each experiment, then pooled over all of them (pairs stay within an
    experiment; give only independent experiments for the pooled row to mean anything)."""
    experiments = {path: load(path) for path in paths}
    header = ["comparison (deployed accuracy)", "experiment", "mean ± s.e. (points)", "pairs"]
    print("| " + " | ".join([*header, "higher / lower", "sign test p"]) + " |")
    print("|---|---|--:|--:|--:|--:|")
    for label, (better, worse, base) in COMPARISONS.items():
        pooled = []
        for path, runs in experiments.items():
            diffs = paired(runs, better, worse, base)
            pooled += diffs
            if diffs:
                print(summary(f"{label} | {experiment_name(path)}", diffs))
        if pooled and len(experiments) > 1:
            print(summary(f"{label} | **pooled**", pooled))


def main(path: str) -> None:
    rows = list(csv.DictReader(open(path)))
    runs = load(path)
    print("| comparison (deployed accuracy) | mean ± s.e. (points) | pairs | higher / lower | sign test p |")
    print("|---|--:|--:|--:|--:|")
    for label, (better, worse, base) in COMPARISONS.items():
        print(summary(label, paired(runs, better, worse, base)))
    print()
    print("| recipe | seed | guided: deployed | unguided: training structure | unguided: deployed |")
    print("|---|--:|--:|--:|--:|")
    for (model, recipe, chosen, seed), unguided in sorted(runs.items()):
        if chosen == "ns+stoch unguided":
            guided = runs.get((model, recipe, "ns+stoch", seed))
            g = f"{100 * float(guided['val_acc_deployed']):.2f}" if guided else "—"
            print(
                f"| {recipe} | {seed} | {g} | {100 * float(unguided['val_acc_training']):.2f} "
                f"| {100 * float(unguided['val_acc_deployed']):.2f} |"
            )
    print("\n".join(final_losses(Path(path), rows)))


if __name__ == "__main__":
    if len(sys.argv) > 2:
        verdicts(sys.argv[1:])
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "runs/fashion_mnist/results.csv")
