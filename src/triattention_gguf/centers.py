"""Query centres in GGUF metadata: the schema, reading, validation and safe rewriting.

Centres are typed key/value metadata under `triattention.` (never tensors), so the
file still loads in any llama.cpp. Rewriting a model file goes through a temporary
file beside the target that is verified (tensor data byte-identical, metadata
reads back) before it is renamed over the target: an interrupted or failed run
leaves the original untouched.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from triattention_gguf.gguf_check import Header
from triattention_gguf.gguf_copy import metadata_of, tensor_bytes, write_gguf
from triattention_gguf.methods import MAX_CLUSTERS, TUNED_SPECS
from triattention_gguf.modelinfo import ModelFacts, ModelFileError, open_gguf

PREFIX = "triattention."
SCHEMA_VERSION = 2  # 2 added the query clusters; version 1 files read as one cluster per head
_T = gguf.GGUFValueType


class CentersError(ValueError):
    """Centres are missing, malformed or belong to another model; the message says what to do."""


@dataclass
class Centers:
    """Calibrated pre-RoPE query statistics of one model, [layer][query head][rotary pair], and
    the same statistics of each query cluster, [layer][query head][cluster][rotary pair]: tri
    scores the keys against one virtual query per cluster (README.md, "Query clusters")."""

    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    rope_type: str
    q_mean: np.ndarray      # complex64 [n_layer, n_head, head_dim/2]: E[q_f]
    q_abs_mean: np.ndarray  # float32   [n_layer, n_head, head_dim/2]: E[|q_f|]
    calibration_tokens: int
    text_sha256: str
    model_fingerprint: str
    cluster_mean: np.ndarray | None = None      # complex64 [n_layer, n_head, n_clusters, head_dim/2]; None: q_mean
    cluster_abs_mean: np.ndarray | None = None  # float32   [n_layer, n_head, n_clusters, head_dim/2]
    tuned: str | None = None  # the tri settings `tune` chose for the model (one of TUNED_SPECS); None: not tuned

    def __post_init__(self):
        if self.cluster_mean is None:  # one cluster: the centre itself
            self.cluster_mean, self.cluster_abs_mean = self.q_mean[:, :, None], self.q_abs_mean[:, :, None]

    @property
    def n_clusters(self) -> int:
        return self.cluster_mean.shape[2]

    @property
    def resultant_length(self) -> np.ndarray:
        """R_f = |E[q_f]| / E[|q_f|] in [0, 1]: how concentrated each band is."""
        return np.abs(self.q_mean) / np.maximum(self.q_abs_mean, np.finfo(np.float32).tiny)

    def head_concentration(self) -> np.ndarray:
        """[n_layer, n_head] R of a whole head: its bands weighted by their mean magnitude."""
        return _concentration(self.q_mean, self.q_abs_mean)

    def cluster_concentration(self) -> np.ndarray:
        """[n_layer, n_head, n_clusters] R of each query cluster, as of a head."""
        return _concentration(self.cluster_mean, self.cluster_abs_mean)

    def kv_head_concentration(self) -> np.ndarray:
        """[n_layer, n_head_kv] the mean R of each KV head's query heads: tri scores the KV heads
        below its min_concentration by recency (cpp/triattention-scorer-tri.cpp)."""
        return self.head_concentration().reshape(self.n_layer, self.n_head_kv, -1).mean(-1)


def _concentration(mean: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    return np.abs(mean).sum(-1) / np.maximum(magnitude.sum(-1), np.finfo(np.float32).tiny)


# key (after PREFIX) -> (GGUF value type, array item type)
_SCHEMA = {
    "version": (_T.UINT32, None),
    "n_layer": (_T.UINT32, None),
    "n_head": (_T.UINT32, None),
    "n_head_kv": (_T.UINT32, None),
    "head_dim": (_T.UINT32, None),
    "n_rot": (_T.UINT32, None),
    "rope_type": (_T.STRING, None),
    "q_mean_real": (_T.ARRAY, _T.FLOAT32),
    "q_mean_imag": (_T.ARRAY, _T.FLOAT32),
    "q_abs_mean": (_T.ARRAY, _T.FLOAT32),
    "calibration.tokens": (_T.UINT64, None),
    "calibration.text_sha256": (_T.STRING, None),
    "model_fingerprint": (_T.STRING, None),
    "clusters": (_T.UINT32, None),
    "cluster.q_mean_real": (_T.ARRAY, _T.FLOAT32),
    "cluster.q_mean_imag": (_T.ARRAY, _T.FLOAT32),
    "cluster.q_abs_mean": (_T.ARRAY, _T.FLOAT32),
}
_ADDED_IN_2 = ("clusters", "cluster.q_mean_real", "cluster.q_mean_imag", "cluster.q_abs_mean")
_OPTIONAL = {"tuned": (_T.STRING, None)}  # written by `tune`, not by embed-centers


def _values(c: Centers) -> dict[str, object]:
    flat = lambda a: np.asarray(a, dtype=np.float32).reshape(-1).tolist()  # noqa: E731
    return {
        "version": SCHEMA_VERSION, "n_layer": c.n_layer, "n_head": c.n_head, "n_head_kv": c.n_head_kv,
        "head_dim": c.head_dim, "n_rot": c.n_rot, "rope_type": c.rope_type,
        "q_mean_real": flat(c.q_mean.real), "q_mean_imag": flat(c.q_mean.imag), "q_abs_mean": flat(c.q_abs_mean),
        "calibration.tokens": c.calibration_tokens, "calibration.text_sha256": c.text_sha256,
        "model_fingerprint": c.model_fingerprint, "clusters": c.n_clusters,
        "cluster.q_mean_real": flat(c.cluster_mean.real), "cluster.q_mean_imag": flat(c.cluster_mean.imag),
        "cluster.q_abs_mean": flat(c.cluster_abs_mean), "tuned": c.tuned,
    }


def _read_fields(header: Header) -> dict[str, object]:
    """Our keys, each exactly of the schema's type (a number stored as a string, an INT32 array
    where FLOAT32 belongs, ... is refused, never converted)."""
    out = {}
    for name, value in header.metadata.items():
        if not name.startswith(PREFIX):
            continue
        key = name[len(PREFIX):]
        expected = _SCHEMA.get(key) or _OPTIONAL.get(key)
        vtype, item = header.types[name]
        if expected is not None and (vtype, item) != expected:
            want = expected[0].name + (f" of {expected[1].name}" if expected[1] else "")
            got = _T(vtype).name + (f" of {_T(item).name}" if item is not None else "")
            raise CentersError(f"{header.path}: {name} is stored as {got}, not {want}; "
                               f"re-embed with `triattention-gguf embed-centers --force {header.path}`")
        out[key] = np.asarray(value, dtype=np.float32) if isinstance(value, list) else value
    return out


def _check_values(where: str, re: np.ndarray, im: np.ndarray, absm: np.ndarray, tokens: int, prefix: str = "") -> None:
    """Centres are means: finite, magnitudes at least the magnitude of the mean, from a positive token
    count. prefix: "cluster." for the clusters' arrays."""
    redo = f"re-embed with `triattention-gguf embed-centers --force {where}`"
    if not (np.all(np.isfinite(re)) and np.all(np.isfinite(im)) and np.all(np.isfinite(absm))):
        raise CentersError(f"{where}: the TriAttention {prefix}centres contain NaN or infinity; {redo}")
    if np.any(absm < 0):
        raise CentersError(f"{where}: {PREFIX}{prefix}q_abs_mean has negative values (it is a mean magnitude); {redo}")
    if np.any(absm < np.hypot(re, im) * (1 - 1e-4) - 1e-6):
        raise CentersError(f"{where}: {PREFIX}{prefix}q_abs_mean is below the magnitude of the mean query somewhere "
                           f"(a mean magnitude never is); {redo}")
    if np.any(np.maximum(absm, np.hypot(re, im)) > 1e15):
        raise CentersError(f"{where}: the TriAttention centres hold values above 1e15, no query is that large; {redo}")
    if tokens <= 0:
        raise CentersError(f"{where}: triattention.calibration.tokens is {tokens}; {redo}")


def centers_from_header(header: Header) -> Centers | None:
    """The centres stored in a file's header, or None when it has none."""
    f = _read_fields(header)
    if not f:
        return None
    where = header.path
    redo = f"re-embed with `triattention-gguf embed-centers --force {where}`"
    if "version" in f and f["version"] not in (1, SCHEMA_VERSION):
        raise CentersError(f"{where}: TriAttention metadata version {f['version']} is not supported "
                           f"(this release reads versions 1 and {SCHEMA_VERSION}); {redo}")
    version = f.get("version", SCHEMA_VERSION)
    missing = [k for k in _SCHEMA if k not in f and (version >= 2 or k not in _ADDED_IN_2)]
    if missing:
        raise CentersError(f"{where}: incomplete TriAttention metadata (missing {', '.join(PREFIX + k for k in missing)}); "
                           f"{redo}")
    shape = (int(f["n_layer"]), int(f["n_head"]), int(f["head_dim"]) // 2)
    re, im, absm = _arrays(where, f, "", shape, "n_layer*n_head*head_dim/2", redo)
    tokens = int(f["calibration.tokens"])
    _check_values(where, re, im, absm, tokens)
    clusters = {}
    if version >= 2:
        if not 1 <= int(f["clusters"]) <= MAX_CLUSTERS:
            raise CentersError(f"{where}: {PREFIX}clusters is {f['clusters']}, not in [1, {MAX_CLUSTERS}]; {redo}")
        shape = shape[:2] + (int(f["clusters"]),) + shape[2:]
        c_re, c_im, c_abs = _arrays(where, f, "cluster.", shape, "n_layer*n_head*clusters*head_dim/2", redo)
        _check_values(where, c_re, c_im, c_abs, tokens, "cluster.")
        clusters = {"cluster_mean": (c_re + 1j * c_im).astype(np.complex64), "cluster_abs_mean": c_abs}
    tuned = f.get("tuned")
    if tuned is not None and tuned not in TUNED_SPECS:
        raise CentersError(f"{where}: {PREFIX}tuned is {tuned!r}, not one of the settings this release knows "
                           f"({', '.join(TUNED_SPECS)}); {redo}, then `triattention-gguf tune {where}`")
    return Centers(
        n_layer=shape[0], n_head=shape[1], n_head_kv=int(f["n_head_kv"]), head_dim=int(f["head_dim"]),
        n_rot=int(f["n_rot"]), rope_type=str(f["rope_type"]), q_mean=(re + 1j * im).astype(np.complex64),
        q_abs_mean=absm.astype(np.float32), calibration_tokens=tokens,
        text_sha256=str(f["calibration.text_sha256"]), model_fingerprint=str(f["model_fingerprint"]),
        tuned=None if tuned is None else str(tuned), **clusters)


def _arrays(where: str, f: dict, prefix: str, shape: tuple, size: str, redo: str) -> list[np.ndarray]:
    """The real, imaginary and magnitude arrays under prefix, in shape."""
    arrays = [f[prefix + k] for k in ("q_mean_real", "q_mean_imag", "q_abs_mean")]
    if any(a.size != np.prod(shape) for a in arrays):
        raise CentersError(f"{where}: TriAttention {prefix}arrays do not have {size} = {np.prod(shape)} entries; "
                           f"{redo}")
    return [a.reshape(shape).astype(np.float32) for a in arrays]


def has_centers(path: str | os.PathLike) -> bool:
    """Whether the file has any TriAttention key, well-formed or not."""
    return any(name.startswith(PREFIX) for name in open_gguf(path).metadata)


def read_centers(path: str | os.PathLike) -> Centers | None:
    return centers_from_header(open_gguf(path))


def validate(centers: Centers, facts: ModelFacts) -> None:
    """Refuse centres that do not belong to this model file."""
    expected = {"n_layer": facts.n_layer, "n_head": facts.n_head, "n_head_kv": facts.n_head_kv,
                "head_dim": facts.head_dim, "n_rot": facts.n_rot, "rope_type": facts.rope_type}
    wrong = [f"{k} {getattr(centers, k)} != {v}" for k, v in expected.items() if getattr(centers, k) != v]
    if not wrong and centers.model_fingerprint != facts.fingerprint:
        wrong.append(f"model fingerprint {centers.model_fingerprint} != {facts.fingerprint}")
    if wrong:
        raise CentersError(f"{facts.path}: the TriAttention centres in this file were computed for another model "
                           f"({'; '.join(wrong)}); re-embed them with "
                           f"`triattention-gguf embed-centers --force {facts.path}`")
    for mean, magnitude, prefix in ((centers.q_mean, centers.q_abs_mean, ""),
                                    (centers.cluster_mean, centers.cluster_abs_mean, "cluster.")):
        _check_values(facts.path, mean.real, mean.imag, magnitude, centers.calibration_tokens, prefix)


def load_centers(facts: ModelFacts) -> Centers:
    """The validated centres of a model file; a clear error when there are none."""
    centers = read_centers(facts.path)
    if centers is None:
        raise CentersError(f"{facts.path} has no TriAttention centres; compute them once with "
                           f"`triattention-gguf embed-centers {facts.path}`")
    validate(centers, facts)
    return centers


def _copy_with_metadata(header: Header, dest: Path, centers: Centers | None) -> None:
    """Write the model to dest with our keys replaced by centers (or removed)."""
    metadata = {k: v for k, v in metadata_of(header).items() if not k.startswith(PREFIX)}
    if centers is not None:
        values = _values(centers)
        metadata |= {PREFIX + key: (values[key], vtype, sub_type)
                     for key, (vtype, sub_type) in (_SCHEMA | _OPTIONAL).items() if values[key] is not None}
    write_gguf(header, dest, metadata, tensor_bytes(header))


def _verify_copy(original: Header, path: Path, centers: Centers | None) -> None:
    copy = open_gguf(path)
    if list(copy.tensors) != list(original.tensors):
        raise OSError(f"verification of {path} failed: tensor list differs")
    data, copied = tensor_bytes(original), tensor_bytes(copy)
    for name, a in original.tensors.items():
        if (a.type, a.shape) != (copy.tensors[name].type, copy.tensors[name].shape) or \
                not np.array_equal(data[name], copied[name]):
            raise OSError(f"verification of {path} failed: tensor {name} differs")
    kept = {k for k in original.metadata if not k.startswith(PREFIX)}
    if not kept <= set(copy.metadata):
        raise OSError(f"verification of {path} failed: metadata {sorted(kept - set(copy.metadata))} lost")
    stored = centers_from_header(copy)
    if centers is None and stored is not None:
        raise OSError(f"verification of {path} failed: centres still present")
    if centers is not None and (stored is None or not all(
            np.array_equal(getattr(stored, a), getattr(centers, a).astype(np.complex64))
            for a in ("q_mean", "cluster_mean")) or stored.tuned != centers.tuned):
        raise OSError(f"verification of {path} failed: centres do not read back")


TMP_SUFFIX = ".triattention-tmp"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_copies(model: str | os.PathLike) -> list[Path]:
    """Remove the temporary copies of model that rewrite_model left when its process was killed
    (named .<model>.<pid>.<random>.triattention-tmp, beside it); copies of running processes stay."""
    model = Path(model)
    removed = []
    for tmp in model.resolve().parent.glob(f".{model.name}.*{TMP_SUFFIX}"):
        pid = tmp.name[len(model.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def check_writable(dest: str | os.PathLike) -> None:
    """Refuse a destination that rewrite_model could not write, before any work is done for it."""
    dest = Path(dest)
    folder = dest.resolve().parent
    if not folder.is_dir():
        raise ModelFileError(f"{dest}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (dest.exists() and not os.access(dest, os.W_OK)):
        raise ModelFileError(f"{dest}: not writable (check permissions, or write a copy elsewhere with -o)")


def rewrite_model(src: str | os.PathLike, centers: Centers | None, dest: str | os.PathLike | None = None) -> Path:
    """Write src with new centres (or none) to dest (default: src, in place), atomically."""
    src = Path(src)
    dest = Path(dest) if dest is not None else src
    header = open_gguf(src)
    check_writable(dest)
    folder = dest.resolve().parent
    # the writer's pid in the name: a later run can tell a copy left by a killed process (remove_stale_copies)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{dest.name}.{os.getpid()}.", suffix=TMP_SUFFIX)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        _copy_with_metadata(header, tmp, centers)
        _verify_copy(header, tmp, centers)
        os.chmod(tmp, (src.stat().st_mode & 0o777))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise ModelFileError(f"could not write {dest}: {err}; the original file is unchanged") from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dest
