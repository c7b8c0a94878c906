"""Compression methods (int8, weight sharing) and the compressed artifact format; importing registers their replays."""

from runner.compress import int8, sharing  # noqa: F401
