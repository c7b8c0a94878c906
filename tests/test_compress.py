"""Compression internals: Huffman, the arithmetic coder and the packed format round-trip exactly and spend the
bits they should; every method keeps pruned zeros; the quantize stage reports where the packed bytes go."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from runner import pruning
from runner.compress import arith, contexts, huffman, int8, packed, sharing
from runner.modelio import load_packed
from runner.models.mlp import lenet_300_100
from tests.conftest import mnist_recipe, read_metrics

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


def test_huffman_stream_is_the_canonical_codes_msb_first_and_a_bad_stream_is_refused():
    """The bits a .dcz file holds: counts 3, 1, 1 give lengths 1, 2, 2, canonical codes 0, 10, 11, so
    [0, 0, 0, 1, 2] is 0001011 (0x16 padded); a stream of a one-symbol code (code `0`) that reads 1 is corrupt."""
    coded = huffman.encode(np.array([0, 0, 0, 1, 2]))
    assert (coded.lengths, coded.bits, coded.nbits) == (b"\x01\x02\x02", b"\x16", 7)
    assert huffman.decode(huffman.Coded(0, coded.lengths, b"\x16\xff", 16, 5)).tolist() == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="corrupt"):
        huffman.decode(huffman.Coded(0, b"\x01", b"\x80", 8, 2))
    with pytest.raises(ValueError, match="corrupt"):  # more symbols than the stream holds
        huffman.decode(huffman.Coded(0, b"\x01", b"\x00", 8, 9))


def _entropy_bits(p: float, n: int) -> float:
    return -n * (p * np.log2(p) + (1 - p) * np.log2(1 - p))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3)), max_size=600))
def test_arithmetic_coder_round_trips_any_bits_under_any_contexts(pairs):
    encoder, model = arith.Encoder(), arith.new_contexts(4)
    for bit, context in pairs:
        encoder.encode(bit, model[context])
    decoder, model = arith.Decoder(encoder.finish()), arith.new_contexts(4)
    assert [decoder.decode(model[context]) for _, context in pairs] == [bit for bit, _ in pairs]


def test_arithmetic_coder_spends_the_entropy_of_each_context():
    rng = np.random.default_rng(0)
    rates = [0.02, 0.3]  # two interleaved sources: one context each
    which = rng.integers(0, 2, 40000)
    bits = (rng.random(40000) < np.take(rates, which)).astype(int)
    encoder, model = arith.Encoder(), arith.new_contexts(2)
    for bit, context in zip(bits.tolist(), which.tolist()):
        encoder.encode(bit, model[context])
    ideal = sum(_entropy_bits(bits[which == c].mean(), int((which == c).sum())) for c in (0, 1)) / 8  # empirical
    assert ideal < len(encoder.finish()) < 1.01 * ideal + 16


def _image_like_mask(rows=120, side=12, seed=0) -> np.ndarray:
    """Each row a side x side 'image' of kept weights: a border nobody keeps, blobs in the middle."""
    rng = np.random.default_rng(seed)
    y, x = np.indices((side, side))
    inside = (y > 1) & (y < side - 2) & (x > 1) & (x < side - 2)
    smooth = rng.random((rows, side, side)) < 0.12
    blobs = smooth | np.roll(smooth, 1, 1) | np.roll(smooth, side // 4, 2)  # vertical runs: image-up correlates
    return (blobs & inside).reshape(rows, side * side).astype(np.int64)


def test_mask_coder_learns_dead_columns_and_the_image_width():
    mask = _image_like_mask()
    lag = contexts.choose_lag(mask)
    assert lag == 12  # one image row back: the strongest link beyond the left neighbour
    data = contexts.encode_mask(mask, lag)
    assert np.array_equal(contexts.decode_mask(data, *mask.shape, lag), mask)
    order0 = _entropy_bits(mask.mean(), mask.size) / 8
    assert len(data) < 0.75 * order0  # dead border columns and vertical runs cost (almost) nothing
    assert len(contexts.encode_mask(mask, 0)) > len(data)  # without the lag it costs more


def test_float_planes_round_trip_bit_for_bit():
    values = np.array([0.0, -0.0, 1e-45, -3.4e38, np.inf, -np.inf, np.nan, 0.1, -0.02, 1.5e-3] * 7, dtype=np.float32)
    back = contexts.decode_floats(contexts.encode_floats(values), values.size, values.dtype)
    assert back.tobytes() == values.tobytes()
    doubles = np.random.default_rng(0).normal(0, 0.05, 50)
    assert contexts.decode_floats(contexts.encode_floats(doubles), 50, doubles.dtype).tobytes() == doubles.tobytes()


def test_header_codec_round_trips_plain_data():
    data = {"model": {"name": "lenet5", "args": {"hidden": [300, 100], "dropout": 0.25, "bn": False}},
            "neg": [-1, -300, 2**40, None, True], "é": "ünïcode", "empty": {}, "list": []}
    out = bytearray()
    packed._dump(data, out)
    assert packed._load(bytes(out), 0)[0] == data


def test_sparse_int8_tensor_packs_smallest_and_exactly():
    values = torch.zeros(100, 300, dtype=torch.int8)
    flat = values.view(-1)
    positions = torch.tensor([0, 1, 40, 1000, 5000, 29999])  # gaps beyond the 5-bit field need fillers
    flat[positions] = torch.tensor([5, -7, 127, -128, 3, 1], dtype=torch.int8)
    model = nn.Module()
    model.register_buffer("codes", values)
    blob = packed.encode(model, SPEC)
    entry = packed.read_header(blob)["entries"]["codes"]
    assert entry["kind"] == "arith" and entry["background"] == 0
    paper = packed._integer_forms(flat.numpy().astype(np.int64), (100, 300), values.numpy().tobytes())[2]
    assert paper[0]["kind"] == "sparse_huffman" and paper[0]["gap_bits"] == 5
    assert len(blob) < packed._size(paper) < 400  # vs 30,000 raw: ~940 fillers (one per 32 zeros) at ~2 bits each
    assert torch.equal(packed.decode_state(blob)["codes"], values)


def test_format_1_artifacts_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="format-1.*rerun the stage"):
        packed.decode_state(b"NNOPTDC1" + bytes(20))


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


def test_packed_shared_model_is_exact_and_its_bytes_are_accounted_for(pruned, tmp_path):
    shared, _ = sharing.share_weights(pruned, {"fc1.*": 5, "fc*": 6}, 20)
    result = packed.write_packed(shared, SPEC, tmp_path / "model.dcz")
    state = packed.decode_state(result.data)
    assert dict(state._metadata) == {k: {"version": v["version"]} for k, v in shared.state_dict()._metadata.items()}
    images = torch.rand(64, 1, 28, 28)
    assert torch.equal(load_packed(tmp_path / "model.dcz")(images), shared(images))
    breakdown = result.breakdown
    assert breakdown["total"] == len(result.data) == sum(breakdown["streams"].values())
    fc1 = breakdown["layers"]["fc1"]
    assert fc1["kept"] == 23520  # 10% of 300 x 784
    assert set(fc1) >= {"positions", "values", "biases", "codebooks", "paper_form_bytes"}
    assert fc1["codebooks"] <= 32 * 4 and fc1["biases"] <= 300 * 4
    assert fc1["values_bits_per_kept"] < 5.05  # 5-bit codebook indices, entropy-coded
    assert fc1["positions"] + fc1["values"] < fc1["paper_form_bytes"]
    assert breakdown["streams"]["header"] < 400


def test_floats_rounded_to_float16_pack_in_two_bytes_and_decode_exactly(pruned, tmp_path):
    shared, _ = sharing.share_weights(pruned, 6, 20)
    full = packed.pack(shared, SPEC).breakdown["streams"]
    sharing.round_floats_to_float16(shared)
    for name, tensor in shared.state_dict().items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32 and torch.equal(tensor.half().float(), tensor), name
    result = packed.write_packed(shared, SPEC, tmp_path / "model.dcz")
    half = result.breakdown["streams"]
    # 410 biases and 3 x 64 centroids: about half the bytes each, the weights' streams unchanged
    assert half["biases"] <= 0.6 * full["biases"] and half["codebooks"] <= 0.6 * full["codebooks"]
    assert half["positions"] == full["positions"] and half["values"] == full["values"]
    images = torch.rand(64, 1, 28, 28)
    assert torch.equal(load_packed(tmp_path / "model.dcz")(images), shared(images))


def test_float16_rounding_refuses_values_beyond_its_range():
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.bias[0] = 1e6
    with pytest.raises(ValueError, match="`bias` holds values beyond float16's range"):
        sharing.round_floats_to_float16(model)


@pytest.mark.slow
def test_quantize_stage_reports_where_the_packed_bytes_go(nnopt, write_recipe, tmp_path):
    stages = [{"name": "train", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
              {"name": "prune", "kind": "prune", "sparsity": 0.9},
              {"name": "share", "kind": "quantize", "method": "weight_sharing", "bits": 4}]
    recipe = mnist_recipe(stages, train_limit=1000)
    code, _, err = nnopt("run", write_recipe(recipe), "-O", tmp_path)
    assert code == 0, err
    metrics = read_metrics(tmp_path / recipe["name"], "03-share")
    file = tmp_path / recipe["name"] / "03-share" / "model.dcz"
    assert metrics["packed_breakdown"]["total"] == metrics["packed_bytes"] == file.stat().st_size
    assert metrics["packed_breakdown"]["layers"]["fc1"]["kept"] == 23520
    images = torch.rand(32, 1, 28, 28)
    from runner.modelio import load_model
    assert torch.equal(load_packed(file)(images), load_model(tmp_path / recipe["name"] / "03-share")(images))
