"""A GGUF file checked before gguf-py, numpy or llama.cpp reads it.

llama.cpp's loader trusts what the header declares: a metadata array of 2^62 elements in a
small file hangs it, a block count of 2^31 or a NaN epsilon crashes it. Here the header is
walked once with every count and length bounded by the bytes left in the file before anything
is allocated or read; keys must be unique, valid UTF-8, with the value types of the GGUF spec;
tensors must lie inside the file. Then the hyper-parameters that llama.cpp trusts are checked
against the tensors. Every problem is one ModelFileError line that names the file, the key or
tensor, what is wrong and what to do.
"""
from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf

_T = gguf.GGUFValueType
_SCALARS = {_T.UINT8: "B", _T.INT8: "b", _T.UINT16: "H", _T.INT16: "h", _T.UINT32: "I", _T.INT32: "i",
            _T.FLOAT32: "f", _T.BOOL: "?", _T.UINT64: "Q", _T.INT64: "q", _T.FLOAT64: "d"}
_MAX_DIMS = 4  # GGML_MAX_DIMS
_REDO = "download or convert it again"


class GGUFError(ValueError):
    """The file is not a usable GGUF; the message names the key or tensor and says what to do."""


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] first
    type: int
    offset: int  # where its data starts in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """Everything but the tensor data, in file order: what the commands read of a model without
    gguf-py's GGUFReader, which takes seconds to parse a tokenizer into numpy views."""
    path: Path
    metadata: dict[str, object]  # scalars and strings as values, arrays as lists
    types: dict[str, tuple[int, int | None]]  # per key: its value type, and an array's item type
    tensors: dict[str, Tensor]


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path}: {what}")

    def take(self, n: int, what: str):
        if n > len(self.buf) - self.pos:
            raise self.fail(f"{what} runs past the end of the file ({len(self.buf)} bytes): "
                            f"the file is truncated or corrupt; {_REDO}")
        start = self.pos
        self.pos += n
        return self.buf[start:self.pos]

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.unpack("Q", f"the length of {what}"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not valid UTF-8 (byte {err.start}); {_REDO}") from None

    def left(self) -> int:
        return len(self.buf) - self.pos


def _value(c: _Cursor, vtype: int, key: str) -> tuple[object, int | None]:
    """The value of key, and its item type if it is an array (else None)."""
    what = f"the value of {key}"
    if vtype in _SCALARS:
        return c.unpack(_SCALARS[vtype], what), None
    if vtype == _T.STRING:
        return c.string(what), None
    if vtype != _T.ARRAY:
        raise c.fail(f"metadata key {key} has value type {vtype}, which GGUF does not define; {_REDO}")
    item = c.unpack("I", f"the item type of {key}")
    count = c.unpack("Q", f"the length of {key}")
    if item == _T.STRING:
        if count > c.left() // 8:  # every string takes at least its 8-byte length
            raise c.fail(f"metadata key {key} declares {count} strings, more than the file can hold; {_REDO}")
        return [c.string(f"item {i} of {key}") for i in range(count)], item
    if item not in _SCALARS:
        kind = "nested arrays" if item == _T.ARRAY else f"items of type {item}, which GGUF does not define"
        raise c.fail(f"metadata key {key} is an array of {kind}; {_REDO}")
    size = struct.calcsize("<" + _SCALARS[item])
    if count > c.left() // size:
        raise c.fail(f"metadata key {key} declares {count} items, more than the file can hold; {_REDO}")
    return list(struct.unpack(f"<{count}{_SCALARS[item]}", c.take(count * size, what))), item


def read_header(path: str | Path) -> Header:
    """Walk the header of a GGUF file, bounded by its size; GGUFError on anything malformed."""
    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size < 24:
            raise GGUFError(f"{path}: {path.stat().st_size} bytes is too short for a GGUF header; {_REDO}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _walk(_Cursor(buf, path))


def _walk(c: _Cursor) -> Header:
    if c.take(4, "the magic") != b"GGUF":
        raise c.fail("not a GGUF file")
    version = c.unpack("I", "the version")
    if version not in (2, 3):
        raise c.fail(f"GGUF version {version} is not supported (2 or 3; a big-endian file reads as a huge "
                     f"number); {_REDO}")
    n_tensors = c.unpack("Q", "the tensor count")
    n_kv = c.unpack("Q", "the metadata count")
    if n_kv > c.left() // 13 or n_tensors > c.left() // 32:  # the smallest key and tensor entries
        raise c.fail(f"the header declares {n_kv} metadata keys and {n_tensors} tensors, more than the file can "
                     f"hold; {_REDO}")
    metadata: dict[str, object] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(n_kv):
        key = c.string(f"the name of metadata key #{i}")
        if key in metadata:
            raise c.fail(f"metadata key {key} appears twice; {_REDO}")
        vtype = c.unpack("I", f"the type of {key}")
        metadata[key], item = _value(c, vtype, key)
        types[key] = (vtype, item)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two; {_REDO}")
    infos: dict[str, tuple[tuple[int, ...], int, int, int]] = {}
    for i in range(n_tensors):
        name = c.string(f"the name of tensor #{i}")
        if name in infos:
            raise c.fail(f"tensor {name} appears twice; {_REDO}")
        n_dims = c.unpack("I", f"the dimension count of tensor {name}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise c.fail(f"tensor {name} has {n_dims} dimensions (1 to {_MAX_DIMS}); {_REDO}")
        shape = tuple(c.unpack("Q", f"the shape of tensor {name}") for _ in range(n_dims))
        ttype = c.unpack("I", f"the type of tensor {name}")
        offset = c.unpack("Q", f"the offset of tensor {name}")
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise c.fail(f"tensor {name} has type {ttype}, which this llama.cpp does not know; {_REDO}") from None
        if min(shape) < 1 or shape[0] % block:
            raise c.fail(f"tensor {name} has shape {list(shape)}, invalid for its type "
                         f"{gguf.GGMLQuantizationType(ttype).name}; {_REDO}")
        nbytes = math.prod(shape) // block * type_size
        if offset % alignment:
            raise c.fail(f"tensor {name} starts at offset {offset}, not a multiple of the alignment {alignment}; "
                         f"{_REDO}")
        infos[name] = (shape, ttype, offset, nbytes)
    data_start = -(-c.pos // alignment) * alignment
    tensors = {name: Tensor(name, shape, ttype, data_start + offset, nbytes)
               for name, (shape, ttype, offset, nbytes) in infos.items()}
    for tensor in tensors.values():
        if tensor.offset + tensor.nbytes > len(c.buf):
            raise c.fail(f"tensor {tensor.name} lies past the end of the file ({len(c.buf)} bytes): the file is "
                         f"truncated or corrupt; {_REDO}")
    return Header(c.path, metadata, types, tensors)


def _positive(value) -> bool:
    """A finite positive number (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def check_hyperparameters(path: str | Path, header: Header) -> None:
    """The hyper-parameters llama.cpp trusts, against the tensors; GGUFError naming the key."""
    meta, tensors = header.metadata, header.tensors
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFError(f"{path}: general.architecture is missing or not a string; {_REDO}")

    def fail(key: str, what: str) -> GGUFError:
        return GGUFError(f"{path}: {key} {what}; {_REDO}")

    blocks = {int(m.group(1)) for name in tensors if (m := re.match(r"blk\.(\d+)\.", name))}
    key = f"{arch}.block_count"
    if blocks:
        count = meta.get(key)
        if not isinstance(count, int) or isinstance(count, bool) or count != max(blocks) + 1:
            raise fail(key, f"is {count!r}, but the tensors hold blocks 0 to {max(blocks)}")
    for name in ("rope.freq_base", "rope.freq_base_swa", "attention.layer_norm_rms_epsilon",
                 "attention.layer_norm_epsilon", "embedding_length", "context_length"):
        key = f"{arch}.{name}"
        if key in meta and not _positive(meta[key]):
            raise fail(key, f"is {meta[key]!r}; it must be a finite positive number")
    n_head, n_head_kv = meta.get(f"{arch}.attention.head_count"), meta.get(f"{arch}.attention.head_count_kv")
    for key, value in ((f"{arch}.attention.head_count", n_head), (f"{arch}.attention.head_count_kv", n_head_kv)):
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(isinstance(v, int) and 0 <= v <= 1 << 16 for v in values):
            raise fail(key, f"is {value!r}; it must be a head count (per layer where it is a list)")
    n_embd = meta.get(f"{arch}.embedding_length")
    embd = tensors.get("token_embd.weight")
    if isinstance(n_embd, int) and embd is not None and embd.shape[0] != n_embd:
        raise fail(f"{arch}.embedding_length", f"is {n_embd}, but token_embd.weight has rows of {embd.shape[0]}")
    if not (isinstance(n_head, int) and isinstance(n_head_kv, int) and n_head > 0 and n_head_kv > 0):
        return
    if n_head % n_head_kv:
        raise fail(f"{arch}.attention.head_count_kv", f"is {n_head_kv}, which does not divide head_count {n_head}")
    key_length = meta.get(f"{arch}.attention.key_length", n_embd // n_head if isinstance(n_embd, int) else None)
    attn_k = tensors.get("blk.0.attn_k.weight")
    if isinstance(key_length, int) and attn_k is not None and len(attn_k.shape) == 2 and \
            attn_k.shape[1] != n_head_kv * key_length:
        raise fail(f"{arch}.attention.head_count_kv", f"x key length ({n_head_kv} x {key_length}) does not match "
                   f"blk.0.attn_k.weight, which projects to {attn_k.shape[1]}")
    attn_q = tensors.get("blk.0.attn_q.weight")
    if isinstance(key_length, int) and attn_q is not None and len(attn_q.shape) == 2 and \
            attn_q.shape[1] not in (n_head * key_length, 2 * n_head * key_length):  # 2x: gated attention
        raise fail(f"{arch}.attention.head_count", f"x key length ({n_head} x {key_length}) does not match "
                   f"blk.0.attn_q.weight, which projects to {attn_q.shape[1]}")


def check_gguf(path: str | Path) -> Header:
    """Structure and hyper-parameters of a GGUF file; GGUFError on the first problem found."""
    header = read_header(path)
    check_hyperparameters(path, header)
    return header
