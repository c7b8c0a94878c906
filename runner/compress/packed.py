"""The compressed artifact (`model.dcz`): Deep Compression's storage (Han et al. 2016 §3-4) for any state dict.

Layout: magic, header length (u32), a JSON header (model spec, transforms, one entry per state-dict
item), then binary blobs. Integer tensors (int8 weights, weight-sharing codebook indices) are
stored whichever way is smallest: raw; Huffman-coded symbols; or sparse, as the relative offsets
between non-background entries (5-bit fields for fc, 8-bit for conv, a filler entry when a gap
overflows the field; §3) Huffman-coded alongside their symbols (§4). Floats are stored raw.
Every byte of the file counts in its size: header, code tables, padding.
"""

from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runner.compress import huffman
from runner.files import write_bytes
from runner.transforms import transforms_of

MAGIC = b"NNOPTDC1"


class _Writer:
    def __init__(self):
        self.blobs: list[bytes] = []
        self.offset = 0

    def blob(self, data: bytes) -> list[int]:
        self.blobs.append(data)
        self.offset += len(data)
        return [self.offset - len(data), len(data)]

    def stream(self, coded: huffman.Coded) -> dict:
        return {"lowest": coded.lowest, "lengths": self.blob(coded.lengths), "bits": self.blob(coded.bits),
                "nbits": coded.nbits, "count": coded.count}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gap_bits(shape: tuple) -> int:
    return 8 if len(shape) > 2 else 5  # Han 2016 §3: 8-bit relative indices for conv, 5-bit for fc


def _sparse_streams(flat: np.ndarray, background: int, gap_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Relative offsets (minus 1) between kept entries and their symbols, fillers inserted for long gaps."""
    positions = np.flatnonzero(flat != background)
    diffs = np.diff(positions, prepend=-1)
    span = 2**gap_bits
    fillers = (diffs - 1) // span
    counts = fillers + 1
    owner = np.repeat(np.arange(len(positions)), counts)
    within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    last = within == fillers[owner]
    gaps = np.where(last, diffs[owner] - 1 - fillers[owner] * span, span - 1)
    symbols = np.where(last, flat[positions][owner], background)
    return gaps, symbols


_STREAM_HEADER = 80  # bytes a Huffman stream adds to the JSON header (lowest, offsets, nbits, count)


def _stored_size(form: dict) -> int:
    return sum(len(v) if isinstance(v, bytes) else len(v.lengths) + len(v.bits) + _STREAM_HEADER
               for v in form.values() if isinstance(v, (bytes, huffman.Coded)))


def _integer_entry(writer: _Writer, tensor: torch.Tensor) -> dict:
    """An integer tensor (int8 weights, codebook indices) in whichever form is smallest on disk: raw bytes,
    Huffman-coded symbols, or sparse (relative offsets and symbols, both Huffman-coded)."""
    flat = tensor.flatten().numpy().astype(np.int64)
    forms = [{"kind": "raw", "blob": tensor.contiguous().numpy().tobytes()}]
    if flat.size:
        forms.append({"kind": "huffman", "symbols": huffman.encode(flat)})
        values, counts = np.unique(flat, return_counts=True)
        background = int(values[np.argmax(counts)])  # 0 for pruned int8 weights, -1 for pruned codebook indices
        gap_bits = _gap_bits(tuple(tensor.shape))
        gaps, symbols = _sparse_streams(flat, background, gap_bits)
        forms.append({"kind": "sparse", "background": background, "gap_bits": gap_bits,
                      "gaps": huffman.encode(gaps), "symbols": huffman.encode(symbols)})
    entry = {"dtype": _dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    for key, value in min(forms, key=_stored_size).items():
        if isinstance(value, huffman.Coded):
            value = writer.stream(value)
        elif isinstance(value, bytes):
            value = writer.blob(value)
        entry[key] = value
    return entry


def _encode_value(writer: _Writer, value: Any) -> dict:
    if value is None:
        return {"kind": "none"}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "value": _dtype_name(value)}
    if isinstance(value, (tuple, list)):
        return {"kind": "tuple", "items": [_encode_value(writer, item) for item in value]}
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cannot pack a state-dict value of type {type(value).__name__}")
    value = value.detach().cpu()
    if value.is_quantized:
        entry = {"kind": "qtensor", "dtype": _dtype_name(value.dtype), "values": _encode_value(writer, value.int_repr())}
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            entry.update(scale=value.q_scale(), zero_point=value.q_zero_point())
        else:
            entry.update(axis=value.q_per_channel_axis(),
                         scales=_encode_value(writer, value.q_per_channel_scales()),
                         zero_points=_encode_value(writer, value.q_per_channel_zero_points()))
        return entry
    if value.dtype.is_floating_point or value.dtype == torch.bool:
        return {"kind": "raw", "dtype": _dtype_name(value.dtype), "shape": list(value.shape),
                "blob": writer.blob(value.contiguous().numpy().tobytes())}
    return _integer_entry(writer, value)


def encode(model: nn.Module, model_spec: dict) -> bytes:
    writer = _Writer()
    state = model.state_dict()
    entries = {name: _encode_value(writer, value) for name, value in state.items()}
    # Module versions: int8 layers read their state differently per version, so they travel too.
    versions = {prefix: meta["version"] for prefix, meta in getattr(state, "_metadata", {}).items() if "version" in meta}
    header = json.dumps({"format": 1, "model": model_spec, "transforms": transforms_of(model), "versions": versions,
                         "entries": entries}, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(writer.blobs)


def write_packed(model: nn.Module, model_spec: dict, path: Path) -> int:
    """Write the compressed artifact; returns its size in bytes."""
    data = encode(model, model_spec)
    write_bytes(Path(path), data)
    return len(data)


def _numpy_dtype(name: str) -> np.dtype:
    return torch.empty(0, dtype=getattr(torch, name)).numpy().dtype


def _decode_value(entry: dict, payload: bytes) -> Any:
    def blob(span):
        return payload[span[0]:span[0] + span[1]]

    def stream(info):
        return huffman.decode(huffman.Coded(info["lowest"], blob(info["lengths"]), blob(info["bits"]),
                                            info["nbits"], info["count"]))

    kind = entry["kind"]
    if kind == "none":
        return None
    if kind == "dtype":
        return getattr(torch, entry["value"])
    if kind == "tuple":
        return tuple(_decode_value(item, payload) for item in entry["items"])
    if kind == "qtensor":
        values = _decode_value(entry["values"], payload)
        if "scale" in entry:
            return torch._make_per_tensor_quantized_tensor(values, entry["scale"], entry["zero_point"])
        return torch._make_per_channel_quantized_tensor(values, _decode_value(entry["scales"], payload),
                                                        _decode_value(entry["zero_points"], payload), entry["axis"])
    dtype, shape = _numpy_dtype(entry["dtype"]), entry["shape"]
    if kind == "raw":
        flat = np.frombuffer(blob(entry["blob"]), dtype=dtype).copy()
    elif kind == "huffman":
        flat = stream(entry["symbols"]).astype(dtype)
    else:
        gaps, symbols = stream(entry["gaps"]), stream(entry["symbols"])
        flat = np.full(int(np.prod(shape)), entry["background"], dtype=dtype)
        flat[np.cumsum(gaps + 1) - 1] = symbols
    return torch.from_numpy(flat.reshape(shape))


def _split(data: bytes) -> tuple[dict, bytes]:
    if data[:len(MAGIC)] != MAGIC:
        raise ValueError("not an nnopt compressed artifact (bad magic bytes)")
    (length,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    return json.loads(data[start:start + length]), data[start + length:]


def read_header(data: bytes) -> dict:
    return _split(data)[0]


def decode_state(data: bytes) -> OrderedDict:
    """The state dict a compressed artifact holds, module versions included."""
    header, payload = _split(data)
    state = OrderedDict((name, _decode_value(entry, payload)) for name, entry in header["entries"].items())
    state._metadata = OrderedDict((prefix, {"version": version}) for prefix, version in header["versions"].items())
    return state
