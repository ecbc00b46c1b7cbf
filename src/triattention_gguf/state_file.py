"""A compressed conversation saved to a file and restored into another Llama of the same model and
compression settings: llama.cpp's state, the tokens, the last logits and what compaction recorded.

Layout: b"TRIASTATE", a little-endian u32 header length, the header (JSON: format version, model
fingerprint, compression settings, sizes and a SHA-256 of the payload), then the payload: input
ids (int32), the saved logits (float32), llama.cpp's state, the compaction records.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import llama_cpp
import numpy as np

MAGIC = b"TRIASTATE"
VERSION = 1


class StateFileError(ValueError):
    pass


def _sections(state: llama_cpp.LlamaState, records: bytes) -> list[bytes]:
    ids = np.asarray(state.input_ids[:state.n_tokens], dtype=np.int32).tobytes()
    return [ids, np.ascontiguousarray(state.scores, dtype=np.float32).tobytes(), state.llama_state, records]


def write(path: str | os.PathLike, state: llama_cpp.LlamaState, records: bytes, identity: dict) -> None:
    """Write atomically: a complete file appears at path, or nothing changes there."""
    sections = _sections(state, records)
    payload = b"".join(sections)
    header = json.dumps({"version": VERSION, **identity, "n_tokens": state.n_tokens, "seed": state.seed,
                         "scores_shape": list(state.scores.shape), "sizes": [len(s) for s in sections],
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode()
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(header)) + header + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _open(path: str | os.PathLike, identity: dict, f) -> tuple[dict, int]:
    """The header of the state file open as f, checked against identity, and where its payload starts."""
    head = f.read(len(MAGIC) + 4)
    if not head.startswith(MAGIC) or len(head) < len(MAGIC) + 4:
        raise StateFileError(f"{path}: not a triattention-gguf state file")
    (size,) = struct.unpack_from("<I", head, len(MAGIC))
    try:
        header = json.loads(f.read(size))
        sizes = [int(n) for n in header["sizes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise StateFileError(f"{path}: the state file's header is damaged ({err})") from err
    if header.get("version") != VERSION:
        raise StateFileError(f"{path}: state file version {header.get('version')}; this version reads {VERSION}")
    for key, value in identity.items():
        if header.get(key) != value:
            raise StateFileError(f"{path}: saved with {key} = {header.get(key)!r}; this Llama has {value!r}")
    start = len(MAGIC) + 4 + size
    if os.fstat(f.fileno()).st_size != start + sum(sizes):
        raise StateFileError(f"{path}: the state file is truncated or corrupt")
    header["sizes"] = sizes
    return header, start


def read_tokens(path: str | os.PathLike, identity: dict) -> np.ndarray:
    """The tokens of the conversation saved at path (the header checked against identity, the
    payload only by its size: read() checks its hash)."""
    with open(path, "rb") as f:
        header, _ = _open(path, identity, f)
        return np.frombuffer(f.read(header["sizes"][0]), dtype=np.int32).copy()


def read(path: str | os.PathLike, identity: dict, n_ctx: int) -> tuple[llama_cpp.LlamaState, bytes]:
    """The state and records saved at path, refused with a StateFileError unless the file is whole
    and was saved with this identity (model fingerprint, compression settings) within n_ctx tokens."""
    with open(path, "rb") as f:
        header, start = _open(path, identity, f)
        payload = f.read()
    sizes = header["sizes"]
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise StateFileError(f"{path}: the state file is truncated or corrupt")
    if header["n_tokens"] > n_ctx:
        raise StateFileError(f"{path}: holds {header['n_tokens']} tokens, more than this Llama's n_ctx {n_ctx}")
    ids, scores, llama_state, records = (payload[a:b] for a, b in zip(np.cumsum([0] + sizes[:-1]), np.cumsum(sizes)))
    state = llama_cpp.LlamaState(input_ids=np.frombuffer(ids, dtype=np.int32).astype(np.intc),
                                 n_tokens=header["n_tokens"], seed=header["seed"],
                                 scores=np.frombuffer(scores, dtype=np.float32).reshape(header["scores_shape"]).copy(),
                                 llama_state=llama_state, llama_state_size=len(llama_state))
    return state, records
