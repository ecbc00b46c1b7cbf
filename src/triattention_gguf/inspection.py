"""`triattention-gguf inspect`: model facts, centre status and how concentrated the heads are."""
from __future__ import annotations

import os

import numpy as np

from triattention_gguf.centers import Centers, CentersError, read_centers, validate
from triattention_gguf.modelinfo import ModelFacts, model_context, model_with_facts, rope_omega

R_BINS = np.linspace(0.0, 1.0, 11)


def facts_and_omega(path: str | os.PathLike) -> tuple[ModelFacts, np.ndarray]:
    with model_with_facts(path) as (model, facts):
        with model_context(model, n_ctx=256, n_threads=1) as ctx:
            return facts, rope_omega(ctx, facts.n_layer, facts.head_dim)


def _histogram(values: np.ndarray) -> list[str]:
    counts, _ = np.histogram(values, bins=R_BINS)
    width = max(counts.max(), 1)
    return [f"  R {lo:.1f}-{hi:.1f} {n:5d} {'#' * int(round(40 * n / width))}"
            for lo, hi, n in zip(R_BINS[:-1], R_BINS[1:], counts)]


def concentration_lines(c: Centers) -> list[str]:
    head_r = c.head_concentration()
    lines = [
        f"concentration: R per head over {head_r.size} query heads "
        f"(median {np.median(head_r):.3f}; R > 0.9: {np.mean(head_r > 0.9):.1%}; "
        f"R > 0.5: {np.mean(head_r > 0.5):.1%})",
        *_histogram(head_r.reshape(-1)),
        "per layer (mean R of its heads, min..max):",
    ]
    lines += [f"  layer {il:3d}: {row.mean():.3f} ({row.min():.3f}..{row.max():.3f})" for il, row in enumerate(head_r)]
    return lines


def report(path: str | os.PathLike) -> tuple[str, Centers | None]:
    facts, omega = facts_and_omega(path)
    w = omega[0][omega[0] > 0]
    lines = [
        f"model: {facts.path}",
        f"  arch {facts.arch}, {facts.n_layer} layers, {facts.n_head} query heads, {facts.n_head_kv} KV heads, "
        f"head_dim {facts.head_dim}, n_rot {facts.n_rot}, rope {facts.rope_type}, trained context {facts.n_ctx_train}",
        f"  rope frequencies (layer 0): {len(w)} rotated pairs, {w.max():.4g} .. {w.min():.4g} rad/token "
        f"(periods {2 * np.pi / w.max():.3g} .. {2 * np.pi / w.min():.3g} tokens)",
        f"  fingerprint {facts.fingerprint}",
    ]
    if facts.n_swa:
        lines.insert(3, f"  sliding window {facts.n_swa} tokens in some layers: compression works on the "
                        "full-attention layers, llama.cpp keeps the others in a window-sized cache")
    centers = read_centers(path)
    if centers is None:
        lines.append(f"centres: none (compute them with `triattention-gguf embed-centers {path}`)")
        return "\n".join(lines), None
    try:
        validate(centers, facts)
        status = "valid for this model"
    except CentersError as err:
        status = f"INVALID: {err}"
    lines += [
        f"centres: {status}",
        f"  calibrated on {centers.calibration_tokens} tokens, text sha256 {centers.text_sha256[:16]}...",
        f"  query clusters per head (tri's virtual queries): {centers.n_clusters}, "
        f"median R of a cluster {np.median(centers.cluster_concentration()):.3f}",
        "  tri's default settings: " + (f"{centers.tuned} (chosen by `triattention-gguf tune`)" if centers.tuned
                                         else f"the reference's (`triattention-gguf tune {path}` measures others)"),
        *concentration_lines(centers),
    ]
    return "\n".join(lines), centers


def plot(centers: Centers, title: str, out: str | os.PathLike) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head_r = centers.head_concentration()
    fig, (ax_hist, ax_map) = plt.subplots(1, 2, figsize=(12, 4.5))
    ax_hist.hist(head_r.reshape(-1), bins=R_BINS, color="tab:blue", edgecolor="black")
    ax_hist.axvline(0.9, color="tab:red", linestyle="--", label=f"R > 0.9: {np.mean(head_r > 0.9):.0%} of heads")
    ax_hist.set(xlabel="mean resultant length R of a query head", ylabel="heads", title="Q concentration per head")
    ax_hist.legend()
    im = ax_map.imshow(head_r.T, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis")
    ax_map.set(xlabel="layer", ylabel="query head", title="R by layer and head")
    fig.colorbar(im, ax=ax_map, label="R")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
