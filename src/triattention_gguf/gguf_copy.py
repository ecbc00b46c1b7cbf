"""A GGUF file written anew from a checked header: its tensors byte for byte, its metadata
replaced. The one way a model is rewritten (centres embedded or stripped)."""
from __future__ import annotations

import os

import gguf
import numpy as np

from triattention_gguf.gguf_check import Header

# key -> (value, value type, item type of an array or None)
Metadata = dict[str, tuple[object, int, "int | None"]]


def metadata_of(header: Header) -> Metadata:
    return {key: (value, *header.types[key]) for key, value in header.metadata.items()}


def tensor_bytes(header: Header) -> dict[str, np.ndarray]:
    """Each tensor's data as bytes, mapped from the file, in file order."""
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    return {t.name: data[t.offset:t.offset + t.nbytes] for t in header.tensors.values()}


def write_gguf(header: Header, dest: str | os.PathLike, metadata: Metadata, data: dict[str, np.ndarray]) -> None:
    """header's tensors (types and shapes) with data (bytes per tensor) and metadata to dest,
    aligned as header's file is."""
    writer = gguf.GGUFWriter(dest, arch=metadata[gguf.Keys.General.ARCHITECTURE][0])
    writer.data_alignment = header.metadata.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    for key, (value, vtype, item) in metadata.items():
        if key != gguf.Keys.General.ARCHITECTURE:  # the writer wrote it first
            writer.add_key_value(key, value, gguf.GGUFValueType(vtype),
                                 sub_type=None if item is None else gguf.GGUFValueType(item))
    for t in header.tensors.values():  # the writer takes numpy's order of dimensions, ggml's reversed
        qtype = gguf.GGMLQuantizationType(t.type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        writer.add_tensor_info(t.name, (*t.shape[:0:-1], t.shape[0] // block * type_size), np.dtype(np.uint8),
                               t.nbytes, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name in header.tensors:
        writer.write_tensor_data(data[name])
    writer.close()
