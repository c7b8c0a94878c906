"""Adaptive binary arithmetic coding: a carry-less 32-bit range coder whose bit probabilities come from counts.

Each context is a two-item list [zeros seen, ones seen]; a bit is coded with the Krichevsky-Trofimov
estimate P(1) = (ones + 1/2) / (seen + 1), then counted. Encoder and decoder update the same counts
in the same order, so nothing about the model is stored: a context that sees n bits costs about
n * H(p) + log2(n) / 2 bits, which is what makes rare, skewed contexts (a pixel every neuron ignores)
nearly free. The coder is Matt Mahoney's lpaq1 scheme with 16-bit probabilities: the interval
[low, high] narrows with each bit, and leading bytes are shifted out once low and high agree on them.
"""

from __future__ import annotations

_TOP = 0xFF000000
_MASK = 0xFFFFFFFF


def new_contexts(count: int) -> list[list[int]]:
    return [[0, 0] for _ in range(count)]


class Encoder:
    def __init__(self):
        self.low, self.high = 0, _MASK
        self.out = bytearray()

    def encode(self, bit: int, context: list[int]) -> None:
        zeros, ones = context
        # P(1) in 1/65536 units, kept inside (0, 65536) so that neither outcome becomes impossible
        p_one = min(max(((2 * ones + 1) << 16) // (2 * (zeros + ones) + 2), 1), 65535)
        split = self.low + (((self.high - self.low) * p_one) >> 16)
        if bit:
            self.high = split
        else:
            self.low = split + 1
        context[bit] += 1
        while not (self.low ^ self.high) & _TOP:
            self.out.append(self.high >> 24)
            self.low = (self.low << 8) & _MASK
            self.high = ((self.high << 8) & _MASK) | 0xFF

    def finish(self) -> bytes:
        """The stream, ended by the fewest bytes whose zero-padded value lies inside [low, high]."""
        for shift in (24, 16, 8, 0):
            value = -(-self.low >> shift) << shift  # low rounded up to a multiple of 2^shift
            if value <= self.high:
                return bytes(self.out) + (value >> shift).to_bytes(4 - shift // 8, "big")
        raise AssertionError("unreachable: at shift 0 the value is low itself")


class Decoder:
    def __init__(self, data: bytes):
        self.data = data
        self.position = 4
        self.low, self.high = 0, _MASK
        self.value = int.from_bytes(data[:4].ljust(4, b"\0"), "big")

    def decode(self, context: list[int]) -> int:
        zeros, ones = context
        p_one = min(max(((2 * ones + 1) << 16) // (2 * (zeros + ones) + 2), 1), 65535)
        split = self.low + (((self.high - self.low) * p_one) >> 16)
        if self.value <= split:
            bit, self.high = 1, split
        else:
            bit, self.low = 0, split + 1
        context[bit] += 1
        while not (self.low ^ self.high) & _TOP:
            self.low = (self.low << 8) & _MASK
            self.high = ((self.high << 8) & _MASK) | 0xFF
            following = self.data[self.position] if self.position < len(self.data) else 0
            self.value = ((self.value << 8) & _MASK) | following
            self.position += 1
        return bit
