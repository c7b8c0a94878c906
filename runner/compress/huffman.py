"""Canonical Huffman coding of integer symbol streams (Deep Compression §4): only code lengths are stored."""

from __future__ import annotations

import heapq
from array import array
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


def _canonical_order(lengths: np.ndarray) -> np.ndarray:
    """The symbols that have a code, sorted by (length, symbol): the order canonical codes count up in."""
    return np.array(sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)), dtype=np.int64)


def _canonical(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes: symbols in `_canonical_order` get consecutive codes (what makes lengths enough)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code, previous = 0, 0
    for symbol in _canonical_order(lengths):
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
    # Each symbol's code goes at its offset in the stream, MSB first: pass j writes bit j of every code longer
    # than j (a symbols x width matrix of bits takes gigabytes for a ResNet's weights). Sorted longest first,
    # those codes are a prefix of the symbols, so each pass reads slices, not a mask.
    ends = np.cumsum(sym_lengths)
    longest_first = np.argsort(-sym_lengths.astype(np.int8), kind="stable")
    sorted_starts = (ends - sym_lengths)[longest_first]
    sorted_codes, sorted_lengths = sym_codes[longest_first], sym_lengths[longest_first]
    at_least = np.bincount(sym_lengths)[::-1].cumsum()[::-1]  # at_least[k]: the codes of k bits or more
    bits = np.zeros(int(ends[-1]), dtype=np.uint8)
    for j in range(int(sym_lengths.max())):
        n = int(at_least[j + 1])
        bits[sorted_starts[:n] + j] = (sorted_codes[:n] >> (sorted_lengths[:n] - 1 - j)) & 1
    return Coded(lowest, lengths.astype(np.uint8).tobytes(), np.packbits(bits).tobytes(), int(bits.size),
                  int(symbols.size))


CHUNK = 1 << 22  # bit positions read per pass: bounded temporaries


def _windows(padded: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """The `width` bits from each bit position on, as integers; `padded` is the stream plus 8 zero bytes."""
    # the 8 bytes from each byte on, as one big-endian word: a view, nothing copied
    words = np.ndarray((len(padded) - 7,), dtype=">u8", buffer=padded, strides=(1,))
    positions = positions.astype(np.uint64)
    # width <= 57, so a word shifted by up to 7 bits still holds the whole window
    return ((words[positions >> np.uint64(3)].astype(np.uint64) << (positions & np.uint64(7)))
            >> np.uint64(64 - width)).astype(np.int64)


def decode(coded: Coded) -> np.ndarray:
    if coded.count == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.frombuffer(coded.lengths, dtype=np.uint8).astype(np.int64)
    codes = _canonical(lengths)
    width = int(lengths.max())
    # Left-justified to `width` bits, canonical codes increase in (length, symbol) order, and a code of length l
    # owns the 2^(width - l) windows that start with it: the code read at a bit position is the last whose
    # left-justified value is at most the window there.
    order = _canonical_order(lengths)
    ordered_lengths = lengths[order]
    first = codes[order] << (width - ordered_lengths)
    past = first + (np.int64(1) << (width - ordered_lengths))
    padded = np.concatenate([np.frombuffer(coded.bits, dtype=np.uint8), np.zeros(8, dtype=np.uint8)])
    step = bytearray(coded.nbits)  # the length of the code read at each bit position
    for start in range(0, coded.nbits, CHUNK):
        window = _windows(padded, np.arange(start, min(start + CHUNK, coded.nbits)), width)
        at = np.searchsorted(first, window, side="right") - 1
        step[start:start + len(window)] = ordered_lengths[at].astype(np.uint8).tobytes()
    # Where a code starts depends on the one before it: a walk over the symbols, by those lengths alone.
    starts = array("q", bytes(8 * coded.count))
    position = 0
    try:
        for i in range(coded.count):
            starts[i] = position
            position += step[position]
    except IndexError:  # the stream ends before `count` symbols
        raise ValueError("corrupt Huffman stream") from None
    window = _windows(padded, np.frombuffer(starts, dtype=np.int64), width)
    at = np.searchsorted(first, window, side="right") - 1
    if (at < 0).any() or (window >= past[at]).any():  # bits that begin no code (an incomplete code)
        raise ValueError("corrupt Huffman stream")
    return order[at] + coded.lowest
