"""Results of `eval` and `bench` as a markdown table, JSON and a PNG plot."""
from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: str | os.PathLike, name: str, rows: list[dict], columns: list[str], meta: dict) -> Path:
    """out_dir/name.json (meta + rows) and out_dir/name.md (the table); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown_table(rows, columns))
    return out


def plot_lines(path: str | os.PathLike, rows: list[dict], x: str, panels: list[tuple[str, str]],
               line_key: str = "method", log_x: bool = True) -> None:
    """One panel per (metric, title) for every model; metric against x, one line per line_key."""
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), len(panels), figsize=(5 * len(panels), 3.6 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, (metric, title) in enumerate(panels):
            ax = axes[i][j]
            mine = [r for r in rows if r["model"] == model and r.get(metric) is not None]
            for line in sorted({r[line_key] for r in mine}):
                points = sorted((r[x], r[metric]) for r in mine if r[line_key] == line)
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=str(line))
            if log_x:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_title(f"{model}: {title}", fontsize=9)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:  # a metric this run did not measure draws no line
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
