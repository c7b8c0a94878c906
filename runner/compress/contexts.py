"""Context models for the arithmetic coder: where a layer's kept weights are, which values they take, float bytes.

Positions: a pruned weight matrix (rows = output units, columns = inputs) is coded bit by bit, kept
or not, in row-major order. A bit's context is what both sides already know: how often its column
was kept in the rows above and how often its row was kept to its left (each a rate bucketed on a
square-root scale, so rare rates get fine buckets), its left neighbour, and the neighbour `lag`
columns back. Inputs that no unit uses (MNIST's border pixels) make columns that cost almost
nothing, dense units rows that cost little; `lag` catches the input's own layout (28 for the rows of
a 28x28 image, the kernel width for a convolution), picked per layer by the encoder and stored.
On a trained LeNet-300-100 at 8% kept this spends 3.2 bits per kept weight of fc1 where Deep
Compression's Huffman-coded 5-bit relative indices spend 4.1 (and the paper reports 3.7).

Values: a binary tree over the value's bits, one adaptive context per tree node (order 0).
Floats: the bytes of the IEEE representation, one plane per byte position, each tree-coded.
"""

from __future__ import annotations

from math import isqrt

import numpy as np

from runner.compress.arith import Decoder, Encoder, new_contexts

COLUMN_LEVELS, ROW_LEVELS = 16, 8
MAX_LAG = 64


def _rate_bucket(ones, seen, levels: int):
    """floor(sqrt(KT rate) * levels), capped: integer arithmetic only, so both sides agree on any machine."""
    scaled = ((2 * ones + 1) * levels * levels) // (2 * seen + 2)
    return np.minimum(np.searchsorted(np.arange(levels) ** 2, scaled, side="right") - 1, levels - 1)


def choose_lag(mask: np.ndarray) -> int:
    """The column offset (beyond the left neighbour) whose bit tells most about a bit: the largest mutual information."""
    columns = mask.shape[1]
    best, best_information = 0, 0.0
    for lag in range(2, min(columns, MAX_LAG + 1)):
        here, back = mask[:, lag:].ravel(), mask[:, :-lag].ravel()
        joint = np.bincount(here * 2 + back, minlength=4).reshape(2, 2) / here.size
        expected = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
        present = joint > 0
        information = float((joint[present] * np.log(joint[present] / expected[present])).sum())
        if information > best_information:
            best, best_information = lag, information
    return best


def encode_mask(mask: np.ndarray, lag: int) -> bytes:
    """A 2-D 0/1 array, row by row, under the contexts described above."""
    rows, columns = mask.shape
    encoder, contexts = Encoder(), new_contexts(COLUMN_LEVELS * ROW_LEVELS * 4)
    column_ones = np.zeros(columns, dtype=np.int64)
    square = ROW_LEVELS * ROW_LEVELS
    for r in range(rows):
        row = mask[r].tolist()
        column_buckets = (_rate_bucket(column_ones, r, COLUMN_LEVELS) * ROW_LEVELS).tolist()
        ones = left = 0
        for c in range(columns):
            far = row[c - lag] if 0 < lag <= c else 0
            bit = row[c]
            row_bucket = min(isqrt(((2 * ones + 1) * square) // (2 * c + 2)), ROW_LEVELS - 1)  # _rate_bucket, inline
            encoder.encode(bit, contexts[(((column_buckets[c] + row_bucket) << 1 | left) << 1) | far])
            ones += bit
            left = bit
        column_ones += mask[r]
    return encoder.finish()


def decode_mask(data: bytes, rows: int, columns: int, lag: int) -> np.ndarray:
    decoder, contexts = Decoder(data), new_contexts(COLUMN_LEVELS * ROW_LEVELS * 4)
    column_ones = np.zeros(columns, dtype=np.int64)
    square = ROW_LEVELS * ROW_LEVELS
    mask = np.zeros((rows, columns), dtype=np.int64)
    for r in range(rows):
        row = [0] * columns
        column_buckets = (_rate_bucket(column_ones, r, COLUMN_LEVELS) * ROW_LEVELS).tolist()
        ones = left = 0
        for c in range(columns):
            far = row[c - lag] if 0 < lag <= c else 0
            row_bucket = min(isqrt(((2 * ones + 1) * square) // (2 * c + 2)), ROW_LEVELS - 1)
            bit = decoder.decode(contexts[(((column_buckets[c] + row_bucket) << 1 | left) << 1) | far])
            row[c] = bit
            ones += bit
            left = bit
        mask[r] = row
        column_ones += mask[r]
    return mask


def _encode_tree(encoder: Encoder, values: list[int], bits: int, contexts: list) -> None:
    for value in values:
        node = 1
        for shift in range(bits - 1, -1, -1):
            bit = (value >> shift) & 1
            encoder.encode(bit, contexts[node])
            node = node << 1 | bit


def _decode_tree(decoder: Decoder, count: int, bits: int, contexts: list) -> list[int]:
    values = []
    for _ in range(count):
        node = 1
        for _ in range(bits):
            node = node << 1 | decoder.decode(contexts[node])
        values.append(node - (1 << bits))
    return values


def encode_values(values: np.ndarray, bits: int) -> bytes:
    """Integers in [0, 2^bits), most significant bit first, one context per node of the binary tree."""
    encoder = Encoder()
    _encode_tree(encoder, values.tolist(), bits, new_contexts(1 << bits))
    return encoder.finish()


def decode_values(data: bytes, count: int, bits: int) -> np.ndarray:
    return np.array(_decode_tree(Decoder(data), count, bits, new_contexts(1 << bits)), dtype=np.int64)


def _planes(dtype: np.dtype) -> tuple[np.dtype, int]:
    little = np.dtype(dtype).newbyteorder("<")
    return little, little.itemsize


def encode_floats(array: np.ndarray) -> bytes:
    """Any float array, losslessly: its little-endian bytes as planes, sign/exponent byte first, each plane its own tree."""
    little, size = _planes(array.dtype)
    planes = np.ascontiguousarray(array, dtype=little).view(np.uint8).reshape(array.size, size)
    encoder = Encoder()
    for plane in range(size - 1, -1, -1):
        _encode_tree(encoder, planes[:, plane].tolist(), 8, new_contexts(256))
    return encoder.finish()


def decode_floats(data: bytes, count: int, dtype: np.dtype) -> np.ndarray:
    little, size = _planes(dtype)
    decoder = Decoder(data)
    planes = np.zeros((count, size), dtype=np.uint8)
    for plane in range(size - 1, -1, -1):
        planes[:, plane] = _decode_tree(decoder, count, 8, new_contexts(256))
    return planes.view(little).ravel().astype(dtype)
