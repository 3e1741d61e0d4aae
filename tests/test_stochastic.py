"""Stochastic neural substitution and neural drop: torch-seeded, exact partitions, no-ops in eval."""

from __future__ import annotations

import copy
import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from neusub import RepConv2d, RepLinear
from neusub.partition import canonical_partition, draw_mixing, mixing_matrix, random_partition

S, N, B = 2, 3, 4  # repvgg on 4 → 4 channels, stride 1: kxk, 1x1, identity


def make_layer(seed: int = 0, **kwargs) -> RepConv2d:
    torch.manual_seed(seed)
    kwargs = {"recipe": "repvgg", "connectivity": "ns", "in_streams": S, **kwargs}
    layer = RepConv2d(4, 4, 3, **kwargs).double()
    assert layer.num_branches == N
    return layer


def bundle(seed: int = 1) -> Tensor:
    return torch.randn(S, B, 4, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def all_pairs(layer: RepConv2d, x: Tensor) -> Tensor:
    """``(S·N, B, ...)`` every pair ``p = l·N + j`` (the naive layer with the same weights)."""
    naive = RepConv2d(4, 4, 3, recipe="repvgg", connectivity="naive", in_streams=S).double()
    naive.load_state_dict(layer.state_dict())
    naive.train(layer.training)
    return naive(x)


def recover_partition(out: Tensor, pairs: Tensor) -> list[frozenset]:
    """Which S pairs sum to each output stream (exactly one choice must match)."""
    groups = []
    for stream in out:
        matches = [
            frozenset(combo)
            for combo in itertools.combinations(range(S * N), S)
            if torch.allclose(pairs[list(combo)].sum(0), stream, rtol=0, atol=1e-12)
        ]
        assert len(matches) == 1, matches
        groups.append(matches[0])
    return groups


# --------------------------------------------------------------------------- reproducibility


def test_same_global_seed_same_output_other_seed_differs():
    a = make_layer(stochastic=1.0)
    b = copy.deepcopy(a)
    x = bundle()
    torch.manual_seed(123)
    out_a = a(x)
    torch.manual_seed(123)
    out_b = b(x)
    assert torch.equal(out_a, out_b)
    torch.manual_seed(124)
    assert not torch.allclose(b(x), out_a)
    # a fresh partition each forward
    torch.manual_seed(7)
    outs = [a(x) for _ in range(4)]
    assert any(not torch.allclose(outs[0], o) for o in outs[1:])


def test_explicit_generator_reproducible_and_independent_of_global_rng():
    x = bundle()
    a = make_layer(stochastic=1.0, neural_drop=0.3, generator=torch.Generator().manual_seed(5))
    b = make_layer(stochastic=1.0, neural_drop=0.3, generator=torch.Generator().manual_seed(5))
    c = make_layer(stochastic=1.0, neural_drop=0.3, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out_a = [a(x) for _ in range(3)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not touched
    torch.manual_seed(99)  # a different global seed changes nothing
    out_b = [b(x) for _ in range(3)]
    for p, q in zip(out_a, out_b):
        assert torch.equal(p, q)
    out_c = [c(x) for _ in range(3)]
    assert any(not torch.allclose(p, q) for p, q in zip(out_a, out_c))


def test_eval_is_deterministic_and_ignores_stochastic_and_neural_drop():
    x = bundle()
    layers = [
        make_layer(stochastic=p, neural_drop=d) for p, d in [(0.0, 0.0), (1.0, 0.0), (0.5, 0.3), (1.0, 1.0)]
    ]
    for layer in layers:
        layer(x).sum().backward()  # same data → same BN statistics in every layer
    reference = layers[0].eval()(x)
    state = torch.get_rng_state()
    for layer in layers:
        layer.eval()
        assert torch.equal(layer(x), reference)
        assert torch.equal(layer(x), reference)
    assert torch.equal(torch.get_rng_state(), state)  # eval draws nothing


# --------------------------------------------------------------------------- partitions


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_random_partition_is_a_permutation_of_all_pairs(streams, branches, seed):
    part = random_partition(streams, branches, torch.Generator().manual_seed(seed))
    assert part.shape == (branches, streams)
    assert torch.equal(part.flatten().sort().values, torch.arange(streams * branches))
    m = mixing_matrix(part, streams, branches)
    assert m.shape == (branches, streams, branches)
    assert set(m.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(m.sum(0), torch.ones(streams, branches))  # one 1 per (l, j) column
    assert torch.equal(m.sum((1, 2)), torch.full((branches,), float(streams)))  # S pairs per output
    for i in range(branches):
        for pair in part[i].tolist():
            assert m[i, pair // branches, pair % branches] == 1


def test_canonical_partition_and_its_mixing_matrix():
    part = canonical_partition(S, N)
    assert part.tolist() == [[src * N + i for src in range(S)] for i in range(N)]
    m = mixing_matrix(part, S, N)
    for i, src, j in itertools.product(range(N), range(S), range(N)):
        assert m[i, src, j] == (1.0 if i == j else 0.0)


def test_random_partition_is_uniform_over_groups():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(S * N, N)
    draws = 3000
    for _ in range(draws):
        part = random_partition(S, N, gen)
        for i in range(N):
            counts[part[i], i] += 1
    assert torch.allclose(counts / draws, torch.full_like(counts, 1 / N), atol=0.04)


def test_draw_mixing_probability_zero_is_canonical():
    gen = torch.Generator().manual_seed(0)
    canon = mixing_matrix(canonical_partition(S, N), S, N)
    for _ in range(5):
        assert torch.equal(draw_mixing(B, S, N, 0.0, 0.0, gen), canon)
    shuffled = [draw_mixing(B, S, N, 1.0, 0.0, gen) for _ in range(20)]
    assert any(not torch.equal(m, canon) for m in shuffled)
    dropped = draw_mixing(B, S, N, 0.0, 0.5, gen)
    assert dropped.shape == (B, N, S, N)
    assert set(dropped.unique().tolist()) <= {0.0, 2.0}
    assert torch.equal((dropped > 0).to(canon.dtype), (dropped > 0).to(canon.dtype) * canon)


# --------------------------------------------------------------------------- layer outputs


def test_stochastic_zero_training_output_is_canonical_partition():
    layer = make_layer(stochastic=0.0)
    x = bundle()
    pairs = all_pairs(layer, x)
    out = layer(x)
    for i in range(N):
        expected = sum(pairs[src * N + i] for src in range(S))
        assert torch.allclose(out[i], expected, rtol=0, atol=1e-12)
    assert recover_partition(out, pairs) == [frozenset(src * N + i for src in range(S)) for i in range(N)]


def test_stochastic_training_output_is_a_partition_of_the_pairs():
    layer = make_layer(stochastic=1.0)
    x = bundle()
    pairs = all_pairs(layer, x)
    everything = frozenset(range(S * N))
    seen = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out = layer(x)
        groups = recover_partition(out, pairs)
        assert frozenset().union(*groups) == everything and sum(map(len, groups)) == S * N
        assert torch.allclose(out.sum(0), pairs.sum(0), rtol=0, atol=1e-12)  # sum is partition-free
        seen.add(tuple(groups))
    canonical = tuple(frozenset(src * N + i for src in range(S)) for i in range(N))
    assert len(seen) > 1 and any(p != canonical for p in seen)


def test_neural_drop_drops_or_rescales_whole_pairs_per_sample():
    p = 0.5
    layer = make_layer(neural_drop=p, generator=torch.Generator().manual_seed(3))
    x = bundle()
    pairs = all_pairs(layer, x)  # (S·N, B, ...)
    out = layer(x)
    kept_any = dropped_any = False
    for i, b in itertools.product(range(N), range(B)):
        candidates = []
        for keep in itertools.product((0.0, 1.0 / (1 - p)), repeat=S):
            value = sum(k * pairs[src * N + i, b] for src, k in enumerate(keep))
            if torch.allclose(out[i, b], torch.as_tensor(value, dtype=out.dtype), rtol=0, atol=1e-12):
                candidates.append(keep)
        assert candidates, (i, b)
        kept_any |= any(k > 0 for k in candidates[0])
        dropped_any |= any(k == 0 for k in candidates[0])
    assert kept_any and dropped_any


def test_neural_drop_one_drops_everything_in_training_only():
    layer = make_layer(neural_drop=1.0)
    x = bundle()
    assert torch.equal(layer(x), torch.zeros_like(layer(x)))
    layer.eval()
    assert layer(x).abs().max() > 0


def test_neural_drop_mask_is_per_sample_for_token_inputs():
    """(S, B, T, D) inputs: all T tokens of a sample share the pair mask (drop-path semantics)."""
    torch.manual_seed(0)
    layer = RepLinear(4, 4, "repvgg", "ns", in_streams=S, neural_drop=0.5).double()
    token = torch.randn(S, B, 1, 4, dtype=torch.float64)
    x = token.expand(S, B, 5, 4).contiguous()  # 5 identical tokens per sample
    for _ in range(3):
        out = layer(x)
        assert torch.allclose(out, out[:, :, :1].expand_as(out), rtol=0, atol=1e-12)
