"""Compression internals: Huffman and the packed format round-trip exactly; every method keeps pruned zeros."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from runner import pruning
from runner.compress import huffman, int8, packed, sharing
from runner.models.mlp import lenet_300_100

SPEC = {"name": "lenet_300_100", "args": {}}


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-300, 300), min_size=1, max_size=400))
def test_huffman_round_trips_any_stream(symbols):
    coded = huffman.encode(np.array(symbols))
    assert huffman.decode(coded).tolist() == symbols


def test_huffman_spends_fewer_bits_on_frequent_symbols():
    stream = np.array([0] * 900 + list(range(1, 101)))
    coded = huffman.encode(stream)
    assert coded.nbits < 0.3 * 8 * stream.size  # far below one byte per symbol
    assert huffman.decode(coded).tolist() == stream.tolist()


def test_sparse_int8_tensor_packs_with_relative_offsets_and_fillers():
    values = torch.zeros(300, 784, dtype=torch.int8)
    flat = values.view(-1)
    positions = torch.tensor([0, 1, 40, 1000, 5000, 235199])  # gaps beyond the 5-bit field need fillers
    flat[positions] = torch.tensor([5, -7, 127, -128, 3, 1], dtype=torch.int8)
    model = nn.Module()
    model.register_buffer("codes", values)
    blob = packed.encode(model, SPEC)
    header = packed.read_header(blob)
    assert header["entries"]["codes"]["kind"] == "sparse"
    assert header["entries"]["codes"]["gap_bits"] == 5
    assert len(blob) < 3000  # vs 235,200 raw: ~7,350 fillers (one per 32 zeros) dominate, at ~2 bits each
    assert torch.equal(packed.decode_state(blob)["codes"], values)


@pytest.fixture
def pruned():
    """LeNet-300-100 with 90% of each layer's weights masked (smallest magnitudes), as a pruning stage leaves it."""
    torch.manual_seed(0)
    model = lenet_300_100()
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    masks = {}
    for name in names:
        weight = model.get_parameter(name).detach().abs()
        masks[name] = weight > weight.flatten().kthvalue(int(0.9 * weight.numel())).values
    pruning.apply_masks(model, masks)
    return model


def _zeros(model) -> dict[str, torch.Tensor]:
    from runner.measure import named_weights

    return {name.removeprefix("module."): w == 0 for name, w in named_weights(model).items() if name.endswith("weight")}


def test_every_method_keeps_the_pruned_zeros(pruned):
    expected = _zeros(pruned)
    assert expected["fc1.weight"].float().mean() == pytest.approx(0.9, abs=1e-3)
    images = torch.rand(64, 1, 28, 28)

    assert _same(_zeros(int8.dynamic_int8(pruned)), expected)

    prepared, _ = int8.prepare(pruned, qat=False, weights="per_channel")
    prepared(images)
    assert _same(_zeros(int8.convert(prepared, images)), expected)

    prepared, _ = int8.prepare(pruned, qat=True, weights="per_tensor")
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(3):  # fine-tuning pushes every weight; the masked ones must not move off zero
        optimizer.zero_grad()
        prepared(images).logsumexp(1).sum().backward()
        optimizer.step()
    assert _same(_zeros(int8.convert(prepared, images)), expected)

    shared, _ = sharing.share_weights(pruned, 3, 20)
    optimizer = torch.optim.SGD(shared.parameters(), lr=1e-4)
    optimizer.zero_grad()
    shared(images).logsumexp(1).sum().backward()
    optimizer.step()
    assert _same(_zeros(shared), expected)
    assert all(n <= 8 for n in sharing.distinct_values(shared).values())
    assert _same(_zeros(pruned), expected)  # the float model the methods started from is untouched


def _same(got: dict, expected: dict) -> bool:
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_centroid_gradient_is_the_sum_of_member_gradients():
    layer = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.1, 0.0, -0.5, 0.12], [0.5, -0.48, 0.11, 0.0], [0.0, 0.09, -0.52, 0.49]]))
    model = nn.Sequential(layer)
    shared, _ = sharing.share_weights(model, 2, 20)
    x = torch.randn(5, 4)
    shared(x).sum().backward()
    dense_grad = x.sum(0).expand(3, 4)  # d(sum of outputs)/dW for every position
    assignment = shared[0].parametrizations.weight[0].assignment.long()
    codebook_grad = shared[0].parametrizations.weight.original.grad
    for cluster in range(4):
        assert codebook_grad[cluster] == pytest.approx(float(dense_grad[assignment == cluster].sum()), abs=1e-5)
    assert (assignment == sharing.PRUNED).sum() == 3  # the three zeros belong to no centroid
