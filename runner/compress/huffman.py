"""Canonical Huffman coding of integer symbol streams (Deep Compression §4): only code lengths are stored."""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Coded:
    lowest: int  # the alphabet is lowest .. lowest + len(lengths) - 1
    lengths: bytes  # one code length per symbol of the alphabet; 0 = symbol absent
    bits: bytes  # the code stream, most significant bit first, zero-padded to a byte
    nbits: int
    count: int  # symbols in the stream


def _code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code lengths for symbol frequencies (a heap of merged subtrees, deepest symbols counted)."""
    lengths = np.zeros(len(counts), dtype=np.int64)
    present = np.flatnonzero(counts)
    if len(present) == 1:
        lengths[present] = 1
        return lengths
    heap = [(int(counts[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:
        c1, t1, s1 = heapq.heappop(heap)
        c2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (c1 + c2, min(t1, t2), s1 + s2))
    return lengths


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes: symbols sorted by (length, symbol) get consecutive codes (what makes lengths enough)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[symbol]) - previous
        codes[symbol] = code
        previous = int(lengths[symbol])
        code += 1
    return codes


def encode(symbols: np.ndarray) -> Coded:
    symbols = np.asarray(symbols, dtype=np.int64).ravel()
    if symbols.size == 0:
        return Coded(0, b"", b"", 0, 0)
    lowest = int(symbols.min())
    index = symbols - lowest
    lengths = _code_lengths(np.bincount(index))
    if lengths.max() > 57:
        raise ValueError("Huffman code longer than 57 bits")  # cannot happen below ~10^11 symbols
    codes = _canonical(lengths)
    sym_codes, sym_lengths = codes[index], lengths[index]
    width = int(sym_lengths.max())
    shifts = sym_lengths[:, None] - 1 - np.arange(width)[None, :]
    bit_matrix = (sym_codes[:, None] >> np.maximum(shifts, 0)) & 1
    bits = bit_matrix[shifts >= 0].astype(np.uint8)  # row-major: each symbol's bits in order
    return Coded(lowest, lengths.astype(np.uint8).tobytes(), np.packbits(bits).tobytes(), int(bits.size),
                  int(symbols.size))


def decode(coded: Coded) -> np.ndarray:
    if coded.count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.frombuffer(coded.lengths, dtype=np.uint8).astype(np.int64)
    codes = _canonical(lengths)
    width = int(lengths.max())
    table = {(int(lengths[s]), int(codes[s])): s + coded.lowest for s in np.flatnonzero(lengths)}
    sizes = sorted(set(int(x) for x in lengths[lengths > 0]))
    bits = np.unpackbits(np.frombuffer(coded.bits, dtype=np.uint8))[:coded.nbits].astype(np.int64)
    padded = np.concatenate([bits, np.zeros(width, dtype=np.int64)])
    # window[p] = the next `width` bits from position p as an integer; a code of length l is its top l bits
    window = np.zeros(coded.nbits, dtype=np.int64)
    for j in range(width):
        window = (window << 1) | padded[j:j + coded.nbits]
    window = window.tolist()
    out = np.empty(coded.count, dtype=np.int64)
    position = 0
    for i in range(coded.count):
        value = window[position]
        for size in sizes:
            symbol = table.get((size, value >> (width - size)))
            if symbol is not None:
                out[i] = symbol
                position += size
                break
        else:
            raise ValueError("corrupt Huffman stream")
    return out
