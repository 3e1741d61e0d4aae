"""The paper's three claims, tested on an experiment's ``results.csv`` (paired by recipe and seed).

    python experiments/claims.py runs/fashion_mnist/results.csv

For each comparison: the mean difference in deployed validation accuracy (points), its
standard error over the (recipe, seed) pairs, how many pairs went each way, and a
two-sided sign-test p-value. Prints markdown.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def compare(runs: dict, better: str, worse: str, recipes: list[str], metric: str = "val_acc_deployed") -> str:
    diffs = []
    for (recipe, setting, seed), row in runs.items():
        if setting == better and recipe in recipes and (recipe, worse, seed) in runs:
            diffs.append(100 * (float(row[metric]) - float(runs[(recipe, worse, seed)][metric])))
    if not diffs:
        return f"| {better} − {worse} | — | — | — | — |"
    mean = statistics.fmean(diffs)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return (
        f"| {better} − {worse} | {mean:+.2f} ± {sem:.2f} | {len(diffs)} | {wins} / {losses} "
        f"| {sign_test(wins, losses):.2f} |"
    )


def main(path: str) -> None:
    rows = list(csv.DictReader(open(path)))
    runs = {(r["recipe"], r["label"].split(" ", 1)[1], r["seed"]): r for r in rows}
    multi = sorted({r["recipe"] for r in rows if r["recipe"] != "plain"})
    print("| comparison (deployed accuracy) | mean ± s.e. (points) | pairs | higher / lower | sign test p |")
    print("|---|--:|--:|--:|--:|")
    print(compare(runs, "ns", "block", multi))
    print(compare(runs, "ns+stoch", "block", multi))
    print(compare(runs, "ns+stoch", "ns", multi))
    print()
    print("| recipe | seed | guided: deployed | unguided: training structure | unguided: deployed |")
    print("|---|--:|--:|--:|--:|")
    by_seed = defaultdict(dict)
    for r in rows:
        by_seed[(r["recipe"], r["seed"])][r["label"].split(" ", 1)[1]] = r
    for (recipe, seed), settings in sorted(by_seed.items()):
        if "ns+stoch unguided" in settings:
            guided, unguided = settings.get("ns+stoch"), settings["ns+stoch unguided"]
            g = f"{100 * float(guided['val_acc_deployed']):.2f}" if guided else "—"
            print(
                f"| {recipe} | {seed} | {g} | {100 * float(unguided['val_acc_training']):.2f} "
                f"| {100 * float(unguided['val_acc_deployed']):.2f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/fashion_mnist/results.csv")
