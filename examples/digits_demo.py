"""Train a small NS network on scikit-learn's bundled digits (8×8), deploy it, compare.

Runs in about a minute on 2 CPU cores with no download:

    python examples/digits_demo.py
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import neusub


def build_model(recipe: str, stochastic: float) -> nn.Module:
    ns = dict(recipe=recipe, connectivity="ns")
    return neusub.StreamSequential(
        neusub.RepConv2d(1, 16, 3, recipe="plain"),  # plain stem
        nn.ReLU(),
        neusub.RepConv2d(16, 32, 3, **ns),
        neusub.GuidedActivation("relu"),
        neusub.RepConv2d(32, 32, 3, stride=2, **ns, stochastic=stochastic),
        neusub.GuidedActivation("relu"),
        neusub.RepConv2d(32, 64, 3, **ns, stochastic=stochastic),
        neusub.GuidedActivation("relu"),
        neusub.StreamMerge(),  # head: sum the streams, then pool and classify
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="nsnet", choices=neusub.list_recipes())
    parser.add_argument("--stochastic", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    (x_train, y_train), (x_val, y_val) = (x[:split], y[:split]), (x[split:], y[split:])

    model = build_model(args.recipe, args.stochastic)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        for batch in torch.randperm(split).split(64):
            loss = nn.functional.cross_entropy(model(x_train[batch]), y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        print(f"epoch {epoch + 1:2d}  loss {loss.item():.3f}  val acc {accuracy(model, x_val, y_val):.4f}")
    print(f"trained in {time.perf_counter() - start:.1f} s")

    deployed = neusub.deploy(model)
    error = neusub.check_equivalence(model, x_val, deployed)
    params = sum(p.numel() for p in model.parameters())
    deployed_params = sum(p.numel() for p in deployed.parameters())
    print(f"training structure: val acc {accuracy(model, x_val, y_val):.4f}, {params} parameters")
    print(f"deployed network:   val acc {accuracy(deployed, x_val, y_val):.4f}, {deployed_params} parameters")
    print(f"max relative error training vs deployed: {error:.2e}")


if __name__ == "__main__":
    main()
