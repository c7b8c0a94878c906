"""The compressed artifact (`model.dcz`): Deep Compression's storage (Han et al. 2016 §3-4) for any state dict, and where its bytes go.

Layout: magic, the header's length (varint), the header (a compact tagged binary encoding of the model
spec, transforms, module versions and one entry per state-dict item, raw-deflated), then the streams
the entries name, back to back. Every tensor is stored whichever way is smallest, losslessly:
- integer tensors (codebook indices, int8 weights): raw; Huffman-coded (§4); the paper's sparse form
  (relative offsets between non-background entries in 5-bit fields for fc / 8-bit for conv, a filler
  entry when a gap overflows, offsets and values Huffman-coded, §3-4); or, for sparse tensors, ours:
  where the entries are (a context-modelled bit per position) and what they hold (a bit tree per
  value), both arithmetic-coded (runner.compress.contexts);
- floats (biases, codebooks): raw, or their byte planes arithmetic-coded; in 2 bytes each when every value
  is exactly a float16 (a weight-sharing stage with `floats: float16` rounds them so).
`pack` also returns where the bytes went, per stream and per layer: the quantize stage reports it.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runner.compress import contexts, huffman
from runner.files import write_bytes
from runner.transforms import transforms_of

MAGIC = b"NNDC\x02"  # format 2: binary header, arithmetic-coded forms (format 1 was JSON + Huffman only)
ARITH_MIN_BACKGROUND = 0.5  # the arithmetic form is tried on tensors at least this sparse (see _integer_forms)
# Float byte planes are arithmetic-coded up to this many values (biases, codebooks): trained weights
# gain ~10% that way at 32 coded bits per value, seconds for a dense layer, so they stay raw.
FLOAT_CODING_LIMIT = 8192


# --- the header: a tagged binary encoding of plain data (None, bool, int, float, str, list, dict) ---

def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, position


def _dump(value: Any, out: bytearray) -> None:
    if value is None or isinstance(value, bool):
        out.append({None: 0, False: 1, True: 2}[value])
    elif isinstance(value, int):
        out.append(3)
        out += _varint(value * 2 if value >= 0 else -value * 2 - 1)  # zigzag: small negatives stay short
    elif isinstance(value, float):
        out.append(4)
        out += struct.pack("<d", value)
    elif isinstance(value, str):
        encoded = value.encode("utf-8")
        out.append(5)
        out += _varint(len(encoded)) + encoded
    elif isinstance(value, (list, tuple)):
        out.append(6)
        out += _varint(len(value))
        for item in value:
            _dump(item, out)
    elif isinstance(value, dict):
        out.append(7)
        out += _varint(len(value))
        for key, item in value.items():
            _dump(str(key), out)
            _dump(item, out)
    else:
        raise TypeError(f"cannot store a {type(value).__name__} in the packed header")


def _load(data: bytes, position: int) -> tuple[Any, int]:
    tag = data[position]
    position += 1
    if tag <= 2:
        return (None, False, True)[tag], position
    if tag == 3:
        raw, position = _read_varint(data, position)
        return (raw >> 1) ^ -(raw & 1), position
    if tag == 4:
        return struct.unpack_from("<d", data, position)[0], position + 8
    if tag == 5:
        length, position = _read_varint(data, position)
        return data[position:position + length].decode("utf-8"), position + length
    count, position = _read_varint(data, position)
    items = []
    for _ in range(count * (2 if tag == 7 else 1)):
        item, position = _load(data, position)
        items.append(item)
    return (items if tag == 6 else dict(zip(items[::2], items[1::2]))), position


def _preset_words() -> bytes:
    """Deflate's preset dictionary: the header's usual words as _dump writes them, so even their first use is a
    back-reference. Part of the format: changing it needs a new MAGIC."""
    words = ("model", "name", "args", "transforms", "kind", "masks", "params", "weight_sharing", "layers", "versions",
             "usual", "more", "absent", "other",
             "entries", "dtype", "shape", "streams", "raw", "floats", "huffman", "sparse_huffman", "arith", "qtensor",
             "tuple", "none", "background", "lowest", "bits", "lag", "gap_bits", "alphabet", "count", "positions_",
             "values_", "scale", "zero_point", "axis", "scales", "zero_points", "values", "float32", "int16", "int8",
             "qint8", "quint8", "int64", "bool", ".parametrizations.weight.0.assignment",
             ".parametrizations.weight.original", ".parametrizations.weight.0", ".parametrizations.weight",
             ".parametrizations", ".weight", ".bias", "._packed_params._packed_params", "conv", "fc")
    out = bytearray()
    for word in words:
        _dump(word, out)
    return bytes(out)


PRESET = _preset_words()


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15, zdict=PRESET)  # raw deflate: no zlib header or checksum
    return compressor.compress(data) + compressor.flush()


def _inflate(data: bytes) -> bytes:
    decompressor = zlib.decompressobj(-15, zdict=PRESET)
    return decompressor.decompress(data) + decompressor.flush()


# --- the streams ---

class _Streams:
    """The payload: streams appended in entry order; each entry records its streams' lengths and roles."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.roles: list[tuple[str, str, int]] = []  # (state-dict name, role, bytes) for the breakdown
        self.sparse: list[tuple[str, int, int]] = []  # (name, kept entries, bytes in the paper's sparse form)

    def add(self, name: str, role: str, data: bytes) -> int:
        self.parts.append(data)
        self.roles.append((name, role, len(data)))
        return len(data)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _numpy_dtype(name: str) -> np.dtype:
    return torch.empty(0, dtype=getattr(torch, name)).numpy().dtype


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


def _table(coded: huffman.Coded) -> bytes:
    """A canonical Huffman table sized right: code lengths two to a byte (lengths above 15 take a byte each)."""
    lengths = np.frombuffer(coded.lengths, dtype=np.uint8)
    if lengths.size and lengths.max() > 15:
        return b"\x01" + coded.lengths
    padded = np.append(lengths, 0) if lengths.size % 2 else lengths
    return b"\x00" + (padded[0::2] << 4 | padded[1::2]).astype(np.uint8).tobytes()


def _untable(data: bytes, alphabet: int) -> bytes:
    body = np.frombuffer(data[1:], dtype=np.uint8)
    if data[0]:
        return body.tobytes()
    return np.stack([body >> 4, body & 15], 1).ravel()[:alphabet].astype(np.uint8).tobytes()


def _huffman_form(coded: huffman.Coded, prefix: str, role: str) -> tuple[dict, list[tuple[str, bytes]]]:
    fields = {f"{prefix}lowest": coded.lowest, f"{prefix}alphabet": len(coded.lengths), f"{prefix}count": coded.count}
    return fields, [("tables", _table(coded)), (role, coded.bits)]


def _integer_forms(flat: np.ndarray, shape: tuple, raw: bytes) -> list[tuple[dict, list[tuple[str, bytes]]]]:
    """Every way to store an integer tensor: (entry fields, [(role, stream)]). The caller keeps the smallest;
    the third (when present) is the paper's sparse form, which the breakdown quotes for comparison."""
    forms = [({"kind": "raw"}, [("values", raw)])]
    if not flat.size:
        return forms
    fields, streams = _huffman_form(huffman.encode(flat), "", "values")
    forms.append(({"kind": "huffman", **fields}, streams))
    values, counts = np.unique(flat, return_counts=True)
    background = int(values[np.argmax(counts)])  # 0 for pruned int8 weights, -1 for pruned codebook indices
    gap_bits = _gap_bits(shape)
    gaps, symbols = _sparse_streams(flat, background, gap_bits)
    gap_fields, gap_streams = _huffman_form(huffman.encode(gaps), "positions_", "positions")
    symbol_fields, symbol_streams = _huffman_form(huffman.encode(symbols), "values_", "values")
    forms.append(({"kind": "sparse_huffman", "background": background, "gap_bits": gap_bits, **gap_fields,
                   **symbol_fields}, gap_streams + symbol_streams))
    # Bit by bit in Python, the arithmetic form costs about a second per 300k positions: dense tensors
    # (int8 conv weights, say) keep Huffman, which gets within a few percent of it there.
    if counts.max() >= ARITH_MIN_BACKGROUND * flat.size:
        mask = (flat != background).reshape(shape[0] if len(shape) > 1 else 1, -1).astype(np.int64)
        kept = flat[flat != background]
        lowest = int(kept.min()) if kept.size else 0
        bits = max(int(kept.max() - lowest).bit_length(), 1) if kept.size else 1
        lag = contexts.choose_lag(mask)
        forms.append(({"kind": "arith", "background": background, "lowest": lowest, "bits": bits, "lag": lag},
                      [("positions", contexts.encode_mask(mask, lag)),
                       ("values", contexts.encode_values(kept - lowest, bits))]))
    return forms


def _float_role(name: str, state: dict) -> str:
    if name.endswith("bias"):
        return "biases"
    if name.endswith(".parametrizations.weight.original") and \
            name.replace(".original", ".0.assignment") in state:  # runner.compress.sharing's codebook
        return "codebooks"
    return "floats"


def _size(form: tuple[dict, list[tuple[str, bytes]]]) -> int:
    return sum(len(stream) for _, stream in form[1]) + 2 * len(form[1])  # ~2 header bytes per stream length


def _encode_tensor(streams: _Streams, name: str, tensor: torch.Tensor, state: dict) -> dict:
    array = tensor.contiguous().numpy()
    shape = tuple(tensor.shape)
    if tensor.dtype.is_floating_point:
        role = _float_role(name, state)
        stored, fields = array, {}
        with np.errstate(over="ignore"):  # beyond float16's range: inf, unequal, so kept as it is
            exact_in_half = array.dtype.itemsize > 2 and np.array_equal(array.astype(np.float16).astype(array.dtype), array)
        if exact_in_half:
            stored, fields = array.astype(np.float16), {"stored": "float16"}  # exact: the decoder widens it back
        forms = [({"kind": "raw", **fields}, [(role, stored.tobytes())])]
        if 0 < array.size <= FLOAT_CODING_LIMIT:
            forms.append(({"kind": "floats", **fields}, [(role, contexts.encode_floats(stored.ravel()))]))
    else:  # integers and booleans (pruning masks)
        flat = array.ravel().astype(np.int64)
        forms = _integer_forms(flat, shape, array.tobytes())
        if len(forms) > 2:
            streams.sparse.append((name, int((flat != forms[2][0]["background"]).sum()), _size(forms[2])))
    fields, chosen = min(forms, key=_size)
    entry = {**fields, "dtype": _dtype_name(tensor.dtype), "shape": list(shape)}
    entry["streams"] = [streams.add(name, role, data) for role, data in chosen]
    return entry


def _encode_value(streams: _Streams, name: str, value: Any, state: dict) -> dict:
    if value is None:
        return {"kind": "none"}
    if isinstance(value, torch.dtype):
        return {"kind": "dtype", "value": _dtype_name(value)}
    if isinstance(value, (tuple, list)):
        return {"kind": "tuple", "items": [_encode_value(streams, name, item, state) for item in value]}
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"cannot pack a state-dict value of type {type(value).__name__}")
    value = value.detach().cpu()
    if value.is_quantized:
        entry = {"kind": "qtensor", "dtype": _dtype_name(value.dtype),
                 "values": _encode_value(streams, name, value.int_repr(), state)}
        if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            entry.update(scale=float(value.q_scale()), zero_point=int(value.q_zero_point()))
        else:
            entry.update(axis=int(value.q_per_channel_axis()),
                         scales=_encode_value(streams, name + ".scales", value.q_per_channel_scales(), state),
                         zero_points=_encode_value(streams, name + ".zero_points", value.q_per_channel_zero_points(), state))
        return entry
    return _encode_tensor(streams, name, value, state)


# --- where the bytes go ---

def _layer(name: str) -> str:
    """The module a state-dict entry belongs to: fc1 for fc1.bias, fc1.parametrizations.weight.original, ..."""
    for marker in (".parametrizations.", "._packed_params", ".scales", ".zero_points"):
        if marker in name:
            return name.split(marker)[0]
    return name.rsplit(".", 1)[0] if "." in name else name


def _breakdown(header_bytes: int, streams: _Streams) -> dict:
    layers: dict[str, dict] = {}
    totals = {"header": header_bytes}
    for name, role, size in streams.roles:
        layer = layers.setdefault(_layer(name), {})
        layer[role] = layer.get(role, 0) + size
        totals[role] = totals.get(role, 0) + size
    for name, kept, paper_bytes in streams.sparse:
        layer = layers[_layer(name)]
        layer["kept"] = layer.get("kept", 0) + kept
        layer["paper_form_bytes"] = layer.get("paper_form_bytes", 0) + paper_bytes
    for layer in layers.values():
        for role in ("positions", "values"):
            if layer.get("kept") and role in layer:
                layer[f"{role}_bits_per_kept"] = round(8 * layer[role] / layer["kept"], 3)
    return {"total": header_bytes + sum(size for _, _, size in streams.roles), "streams": totals, "layers": layers}


def _module_prefixes(names) -> set[str]:
    """The modules a state dict's keys imply: every dotted prefix of every key, "" (the root) included."""
    prefixes = {""}
    for name in names:
        parts = name.split(".")[:-1]
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return prefixes


def _versions(state: dict) -> dict:
    """Module versions (int8 layers read their state differently per version), stored as exceptions to what
    the keys imply: the usual version, the modules with no state (activations), those it does not apply to."""
    versions = {prefix: meta["version"] for prefix, meta in getattr(state, "_metadata", {}).items() if "version" in meta}
    usual = Counter(versions.values()).most_common(1)[0][0] if versions else 1
    implied = _module_prefixes(state.keys())
    return {"usual": usual, "more": [p for p in versions if p not in implied],
            "absent": sorted(implied - versions.keys()),
            "other": {prefix: v for prefix, v in versions.items() if v != usual}}


def _unversions(stored: dict, names) -> OrderedDict:
    prefixes = (_module_prefixes(names) - set(stored["absent"])) | set(stored["more"])
    return OrderedDict((prefix, {"version": stored["other"].get(prefix, stored["usual"])}) for prefix in sorted(prefixes))


@dataclass(frozen=True)
class Packed:
    data: bytes
    breakdown: dict  # bytes per stream (header, positions, values, tables, biases, codebooks, floats) and per layer


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def pack(model: nn.Module, model_spec: dict) -> Packed:
    """The compressed artifact of `model` and where its bytes go."""
    streams = _Streams()
    state = model.state_dict()
    entries = {name: _encode_value(streams, name, value, state) for name, value in state.items()}
    header = bytearray()
    # The spec's keys sorted: the same model packs to the same bytes however its recipe ordered them.
    _dump({"model": _sorted_keys(model_spec), "transforms": transforms_of(model), "versions": _versions(state),
           "entries": entries}, header)
    header = _deflate(bytes(header))
    data = MAGIC + _varint(len(header)) + header + b"".join(streams.parts)
    return Packed(data, _breakdown(len(data) - sum(map(len, streams.parts)), streams))


def encode(model: nn.Module, model_spec: dict) -> bytes:
    return pack(model, model_spec).data


def write_packed(model: nn.Module, model_spec: dict, path: Path) -> Packed:
    """Write the compressed artifact; returns it with its breakdown (len(result.data) is the file's size)."""
    result = pack(model, model_spec)
    write_bytes(Path(path), result.data)
    return result


# --- decoding ---

def _split(data: bytes) -> tuple[dict, bytes]:
    if data[:len(MAGIC)] != MAGIC:
        if data[:8] == b"NNOPTDC1":
            raise ValueError("a format-1 compressed artifact (an older nnopt); rerun the stage that wrote it")
        raise ValueError("not an nnopt compressed artifact (bad magic bytes)")
    length, start = _read_varint(data, len(MAGIC))
    header, _ = _load(_inflate(data[start:start + length]), 0)
    return header, data[start + length:]


def read_header(data: bytes) -> dict:
    """The model spec, transforms, module versions and one entry per state-dict item."""
    return _split(data)[0]


class _Reader:
    def __init__(self, payload: bytes):
        self.payload, self.position = payload, 0

    def take(self, length: int) -> bytes:
        self.position += length
        return self.payload[self.position - length:self.position]


def _huffman_decode(entry: dict, prefix: str, table: bytes, bits: bytes) -> np.ndarray:
    lengths = _untable(table, entry[f"{prefix}alphabet"])
    return huffman.decode(huffman.Coded(entry[f"{prefix}lowest"], lengths, bits, 8 * len(bits), entry[f"{prefix}count"]))


def _decode_tensor(entry: dict, reader: _Reader) -> torch.Tensor:
    dtype, shape = _numpy_dtype(entry["dtype"]), entry["shape"]
    stored = _numpy_dtype(entry.get("stored", entry["dtype"]))
    count = int(np.prod(shape))
    streams = [reader.take(length) for length in entry["streams"]]
    kind = entry["kind"]
    if kind == "raw":
        flat = np.frombuffer(streams[0], dtype=stored).astype(dtype)
    elif kind == "floats":
        flat = contexts.decode_floats(streams[0], count, stored).astype(dtype)
    elif kind == "huffman":
        flat = _huffman_decode(entry, "", *streams).astype(dtype)
    elif kind == "sparse_huffman":
        gaps = _huffman_decode(entry, "positions_", streams[0], streams[1])
        symbols = _huffman_decode(entry, "values_", streams[2], streams[3])
        flat = np.full(count, entry["background"], dtype=dtype)
        flat[np.cumsum(gaps + 1) - 1] = symbols
    elif kind == "arith":
        rows = shape[0] if len(shape) > 1 else 1
        mask = contexts.decode_mask(streams[0], rows, count // rows, entry["lag"]).ravel().astype(bool)
        flat = np.full(count, entry["background"], dtype=dtype)
        flat[mask] = contexts.decode_values(streams[1], int(mask.sum()), entry["bits"]) + entry["lowest"]
    else:
        raise ValueError(f"unknown tensor form `{kind}` in the compressed artifact")
    return torch.from_numpy(flat.reshape(shape))


def _decode_value(entry: dict, reader: _Reader) -> Any:
    kind = entry["kind"]
    if kind == "none":
        return None
    if kind == "dtype":
        return getattr(torch, entry["value"])
    if kind == "tuple":
        return tuple(_decode_value(item, reader) for item in entry["items"])
    if kind == "qtensor":
        values = _decode_value(entry["values"], reader)
        if "scale" in entry:
            return torch._make_per_tensor_quantized_tensor(values, entry["scale"], entry["zero_point"])
        scales = _decode_value(entry["scales"], reader)
        return torch._make_per_channel_quantized_tensor(values, scales, _decode_value(entry["zero_points"], reader),
                                                        entry["axis"])
    return _decode_tensor(entry, reader)


def decode_state(data: bytes) -> OrderedDict:
    """The state dict a compressed artifact holds, module versions included."""
    header, payload = _split(data)
    reader = _Reader(payload)
    state = OrderedDict((name, _decode_value(entry, reader)) for name, entry in header["entries"].items())
    state._metadata = _unversions(header["versions"], header["entries"])
    return state
