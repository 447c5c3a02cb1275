"""`erasekit report RUN...`: one self-contained HTML file (images embedded) and a Markdown table comparing runs.

A RUN is a run folder (run.json, history.json, eval-<suite>.json with its .png grid, spectrum.png) or
an evaluation JSON file. The tables are built by pure functions; only :func:`write_report` reads and writes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erasekit.atomic import atomic_write_files
from erasekit.errors import ErasekitError

CSS = """body{font-family:sans-serif;margin:24px;color:#222;max-width:1400px}table{border-collapse:collapse;margin:8px 0 20px}
th,td{border:1px solid #999;padding:4px 10px;text-align:right}th{background:#e8e8f0}td:first-child,td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #ccc;margin:6px 0}pre{background:#f4f4f4;padding:8px;white-space:pre-wrap}h2{border-bottom:2px solid #446}
.explain{max-width:900px}.explain p{margin:6px 0}.warn{color:#8a4b00;background:#fff4e0;padding:4px 8px;border-left:4px solid #d98b00}"""


@dataclass
class RunData:
    """What one RUN argument holds."""

    name: str
    folder: Path | None
    run: dict[str, Any] | None = None
    history: dict[str, Any] | None = None
    evals: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    spectrum: Path | None = None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ErasekitError(f"cannot read {path}: {exc}") from None


def load_run(source: str | Path) -> RunData:
    """Read a run folder or an evaluation JSON file."""
    path = Path(source)
    if path.is_file() and path.suffix == ".json":
        return RunData(path.stem, None, evals=[(path, _read_json(path))])
    if not path.is_dir():
        raise ErasekitError(f"no run folder or evaluation JSON at {path}; pass folders written by `erasekit erase` and `erasekit evaluate`")
    data = RunData(path.name, path)
    if (path / "run.json").is_file():
        data.run = _read_json(path / "run.json")
    if (path / "history.json").is_file():
        data.history = _read_json(path / "history.json")
    data.evals = [(p, _read_json(p)) for p in sorted(path.glob("eval-*.json"))]
    data.spectrum = path / "spectrum.png" if (path / "spectrum.png").is_file() else None
    if data.run is None and not data.evals:
        raise ErasekitError(f"{path} holds neither run.json nor eval-*.json; evaluate it first with `erasekit evaluate {path} --suite toy-objects`")
    return data


def fmt(key: str, value: Any) -> str:
    """A metric as the table prints it: percentages with one decimal, FIDs with four significant digits."""
    if value is None:
        return "–"
    if isinstance(value, (int, float)):
        return f"{value:.4g}" if "FID" in key else f"{value:.1f}"
    return str(value)


def metrics_tables(runs: list[RunData]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per suite: the columns and the rows (run, model, headline metrics, then comparison metrics for the erased row)."""
    tables: dict[str, tuple[list[str], list[list[str]]]] = {}
    collected: dict[str, list[tuple[str, str, dict[str, Any]]]] = {}
    for run in runs:
        for _, ev in run.evals:
            suite = ev.get("suite", "?")
            for model, m in ev.get("metrics", {}).items():
                values = dict(m.get("headline", {}))
                if model == "erased":
                    values.update(ev.get("comparison", {}).get("headline", {}))
                label = model if model == "base" else f"{ev.get('method') or 'erased'} ✕ {', '.join(ev.get('concepts', []))}"
                collected.setdefault(suite, []).append((run.name, label, values))
    for suite, rows in collected.items():
        keys = list(dict.fromkeys(k for _, _, values in rows for k in values))
        columns = ["run", "model", *keys]
        tables[suite] = (columns, [[name, label, *(fmt(k, values.get(k)) for k in keys)] for name, label, values in rows])
    return tables


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = ["---", "---", *["---:"] * (len(columns) - 2)]
    return "\n".join([line(columns), "| " + " | ".join(align) + " |", *(line(r) for r in rows)])


def html_table(columns: list[str], rows: list[list[str]]) -> str:
    """An HTML table of already-formatted cells."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img_tag(png: bytes, alt: str) -> str:
    """An <img> with the PNG embedded as a data URI."""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def history_plot(history: dict[str, Any]) -> bytes | None:
    """EAP's training history as a PNG: losses per step, the adversarial concept per step, the final search distribution."""
    steps = [s for s in history.get("steps") or [] if "step" in s]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adversarial = [s.get("most_sensitive") or s.get("adversarial") for s in steps]
    probabilities = ((history.get("search") or {}).get("probabilities") or [])
    panels = 1 + any(adversarial) + bool(probabilities)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    x = [s["step"] for s in steps]
    for key in ("erase_loss", "preserve_loss"):
        if any(key in s for s in steps):
            ax.plot(x, [s.get(key, float("nan")) for s in steps], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log" if all(s.get("erase_loss", 1) > 0 and s.get("preserve_loss", 1) > 0 for s in steps) else "linear")
    ax.legend()
    ax.set_title("losses")
    col = 1
    if any(adversarial):
        names = list(dict.fromkeys(a for a in adversarial if a))
        ax = axes[0][col]
        ax.scatter([xi for xi, a in zip(x, adversarial) if a], [names.index(a) for a in adversarial if a], s=8)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_xlabel("step")
        ax.set_title("most sensitive concept")
        col += 1
    if probabilities:
        ax = axes[0][col]
        top = sorted(probabilities[0].items(), key=lambda kv: -kv[1])[:12]
        ax.barh([k for k, _ in top][::-1], [v for _, v in top][::-1])
        ax.set_title("final search distribution" + (" (first target)" if len(probabilities) > 1 else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text, quote=False)}</pre>"


def _details(run: RunData) -> str:
    """Commands, seeds, settings and versions that produced a run's numbers."""
    parts = []
    if run.run:
        parts.append("<p><b>erase command</b></p>" + _pre(str(run.run.get("command", "–"))))
        parts.append("<p><b>method config</b></p>" + _pre(json.dumps(run.run.get("config", {}), indent=1, sort_keys=True)))
        parts.append("<p><b>versions (erase)</b></p>" + _pre(json.dumps(run.run.get("versions", {}), sort_keys=True)))
    for path, ev in run.evals:
        info = {"command": ev.get("command"), "settings": ev.get("settings"), "seeds": ev.get("seeds"), "scorer": ev.get("scorer"),
                "model_hash": ev.get("model_hash"), "versions": ev.get("versions")}
        parts.append(f"<p><b>{html.escape(path.name)}</b></p>" + _pre(json.dumps(info, indent=1, sort_keys=True)))
    return "".join(parts)


def comparison_section(summary: dict[str, Any]) -> str:
    """`erasekit compare --seeds N`: the table of means with their 95 % intervals, and the intervals drawn."""
    from erasekit.compare_table import interval_plot, markdown

    lines = [ln for ln in markdown(summary).splitlines() if ln.startswith("|")]
    cells = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    out = f"<h2>comparison over training seeds</h2><p>{html.escape(markdown(summary).splitlines()[0].lstrip('# '))}</p>"
    out += html_table(cells[0], [c for c in cells[2:]])
    plot = interval_plot(summary)
    return out + (img_tag(plot, "rates with 95 % intervals") if plot else "")


def render_html(runs: list[RunData], title: str = "erasekit report", comparison: dict[str, Any] | None = None) -> str:
    """The whole report as one HTML string (no external resources)."""
    out = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>"]
    if comparison is not None:
        out.append(comparison_section(comparison))
    for suite, (columns, rows) in metrics_tables(runs).items():
        out.append(f"<h2>{html.escape(suite)}</h2>{html_table(columns, rows)}")
        out.append(explanation_html(suite_evals(runs, suite)))
    for run in runs:
        out.append(f"<h2>run: {html.escape(run.name)}</h2>")
        for path, ev in run.evals:
            grid = path.with_suffix(".png")
            out.append(f"<h3>{html.escape(ev.get('suite', path.stem))}: base vs erased, per prompt</h3>")
            out.append(img_tag(grid.read_bytes(), f"image grid {path.stem}") if grid.is_file() else "<p>(no image grid saved)</p>")
        if run.history and (plot := history_plot(run.history)):
            out.append("<h3>adversarial-concept history</h3>" + img_tag(plot, "history"))
        if run.spectrum:
            out.append("<h3>sensitivity spectrum</h3>" + img_tag(run.spectrum.read_bytes(), "spectrum"))
        out.append("<h3>how these numbers were produced</h3>" + _details(run))
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(runs: list[RunData]) -> str:
    """Every suite's metrics table in Markdown, for papers, each followed by what its metrics mean and rest on."""
    return "\n\n".join(f"### {suite}\n\n{markdown_table(c, r)}\n\n{explanation_markdown(suite_evals(runs, suite))}"
                       for suite, (c, r) in metrics_tables(runs).items()) + "\n"


def suite_evals(runs: list[RunData], suite: str) -> list[tuple[str, dict[str, Any]]]:
    """(run name, evaluation record) of every run evaluated with ``suite``."""
    return [(run.name, ev) for run in runs for _, ev in run.evals if ev.get("suite", "?") == suite]


def explanation_html(evals: list[tuple[str, dict[str, Any]]]) -> str:
    """One paragraph per metric in plain words, the images and seeds behind its figures, and warnings where too few."""
    from erasekit.eval.explain import SEEDS_NOTE, explain

    parts = []
    for text, counts, warnings in explain(evals):
        parts.append(f"<p>{html.escape(text)}<br><small>{html.escape('; '.join(counts))}.</small></p>")
        parts += [f"<p class='warn'>warning: {html.escape(w)}.</p>" for w in warnings]
    if any(ev.get("method") for _, ev in evals):
        parts.append(f"<p><small>{html.escape(SEEDS_NOTE)}</small></p>")
    return "<div class='explain'>" + "".join(parts) + "</div>"


def explanation_markdown(evals: list[tuple[str, dict[str, Any]]]) -> str:
    """The same explanations as :func:`explanation_html`, as Markdown paragraphs."""
    from erasekit.eval.explain import SEEDS_NOTE, explain

    parts = []
    for text, counts, warnings in explain(evals):
        parts.append(f"{text} *Behind the figures: {'; '.join(counts)}.*")
        parts += [f"> **Warning:** {w}." for w in warnings]
    if any(ev.get("method") for _, ev in evals):
        parts.append(SEEDS_NOTE)
    return "\n\n".join(parts)


def write_report(sources: Sequence[str | Path], out: str | Path, comparison: dict[str, Any] | None = None, overwrite: bool = False) -> tuple[Path, Path]:
    """Write report.html and report.md (same stem) atomically, refusing to replace them unless ``overwrite``; returns both paths.

    ``comparison``: a compare summary with intervals.
    """
    if not sources:
        raise ErasekitError("no RUN given; pass one or more run folders (or evaluation JSON files)")
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise ErasekitError(f"--out must end in .html, got {out.name}")
    if not out.parent.is_dir():
        raise ErasekitError(f"folder {out.parent} does not exist; create it first")
    md = out.with_suffix(".md")
    if not overwrite and (taken := [p for p in (out, md) if p.exists()]):
        raise ErasekitError(f"{taken[0]} already exists; pass --overwrite (overwrite=True from Python) to replace it, or choose another --out")
    runs = [load_run(s) for s in sources]
    if not any(run.evals for run in runs):
        raise ErasekitError("none of the runs has been evaluated; run `erasekit evaluate RUN --suite toy-objects` first")
    html_text = render_html(runs, comparison=comparison)
    md_text = render_markdown(runs)
    if comparison is not None:
        from erasekit.compare_table import markdown

        md_text = markdown(comparison) + "\n" + md_text
    atomic_write_files({out: html_text.encode("utf-8"), md: md_text.encode("utf-8")})  # both or neither
    return out, md
