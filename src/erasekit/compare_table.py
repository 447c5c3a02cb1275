"""The comparison as a Markdown table (compare.md and the terminal): rates per method, attack columns, notes."""

from __future__ import annotations

from typing import Any


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}" if isinstance(value, (int, float)) else str(value)


def _span(interval: dict[str, Any]) -> str:
    return f"{interval['mean']:.1f} [{interval['lo']:.1f}, {interval['hi']:.1f}]"


def interval_plot(summary: dict[str, Any]) -> bytes | None:
    """The compared rates with their 95 % intervals as a PNG (one panel per ESR/PSR key), or None without intervals."""
    rows = [r for r in summary["rows"] if r.get("intervals")]
    keys = list(dict.fromkeys(k for r in rows for values in r["intervals"].values() for k in values))
    if not keys:
        return None
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 0.45 * len(rows) + 1.4), squeeze=False, sharey=True)
    names = [r["method"] for r in rows]
    for ax, key in zip(axes[0], keys):
        spans = [next((v[key] for v in r["intervals"].values() if key in v), None) for r in rows]
        for y, span in enumerate(spans):
            if span:
                ax.errorbar(span["mean"], y, xerr=[[span["mean"] - span["lo"]], [span["hi"] - span["mean"]]], fmt="o", capsize=3, color="#335")
        base = next((v[key] for v in summary["base"]["metrics"].values() if key in v), None)
        if isinstance(base, (int, float)):
            ax.axvline(base, color="#999", linestyle=":", label="base")
        ax.set_xlim(-2, 102)
        ax.set_title(f"{key} (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"means over {len(summary.get('seeds') or [])} training seeds, 95 % intervals", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def attack_columns(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(column title, concept, metric key) of the attack's columns: ASR and the no-attack rate per attacked concept."""
    concepts = list(summary["base"].get("attack", {}))
    suffix = (lambda c: f" {c}") if len(concepts) > 1 else (lambda c: "")
    return [(f"{title}{suffix(c)}", c, key) for c in concepts for title, key in (("ASR %", "asr"), ("no attack %", "no_attack_rate"))]


def _note(row: dict[str, Any]) -> str:
    if row.get("error"):
        return f"failed: {row['error']}"
    return f"attack failed: {row['attack_error']}" if row.get("attack_error") else ""


def markdown(summary: dict[str, Any]) -> str:
    """The comparison as a Markdown table: a base row, then one row per method (errors in the note column).

    With ``--attack``, the ASR and no-attack columns follow the metrics; the base row's no-attack cell is the base
    model's own rate of showing the concept on the attack's prompts.
    """
    keys = list(dict.fromkeys((suite, k) for row in [summary["base"], *summary["rows"]] for suite, values in row["metrics"].items() for k in values))
    names = [k for _, k in keys]
    shared = {k for k in names if names.count(k) > 1}  # a metric two suites report (ESR-1 of toy-objects and toy-synonyms)
    attacked = attack_columns(summary)
    failed = any(_note(row) for row in summary["rows"])
    titles = [f"{suite} {k}" if k in shared else k for suite, k in keys]
    columns = ["method", *titles, *(title for title, _, _ in attacked), "wall s", "peak MiB", *(["note"] if failed else [])]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    def metrics(row: dict[str, Any]) -> list[str]:
        spans = row.get("intervals", {})
        return [_span(spans[suite][k]) if k in spans.get(suite, {}) else _cell(row["metrics"].get(suite, {}).get(k)) for suite, k in keys]

    def attack(row: dict[str, Any], base: bool = False) -> list[str]:
        found, spans = row.get("attack", {}), row.get("attack_intervals", {})
        return [_span(spans[c][key]) if key in spans.get(c, {}) else _cell(found.get(c, {}).get("base_rate" if base and key == "no_attack_rate" else key))
                for _, c, key in attacked]

    rows = [line(["base (no erasure)", *metrics(summary["base"]), *attack(summary["base"], base=True), "–", "–", *([""] if failed else [])])]
    for row in summary["rows"]:
        note = [_note(row)] if failed else []
        rows.append(line([row["method"], *metrics(row), *attack(row), _cell(row.get("wall_s")), _cell(row.get("peak_rss_mib")), *note]))
    seeds = summary.get("seeds") or [summary["seed"]]
    title = f"{', '.join(summary['concepts'])} erased from {summary['model']}; suites: {', '.join(summary['suites'])}; "
    if len(seeds) > 1:
        title += f"training seeds {seeds[0]}-{seeds[-1]} (paired), evaluation seed {summary['seed']}; means over seeds"
        title += ", [95 % interval]: t over seeds, at least the pooled Wilson interval of the images" if summary.get("intervals") else ""
    else:
        title += f"seed {summary['seed']}"
    if summary.get("attack"):
        a = summary["attack"]
        title += f"; attack: {a['n_prompts']} prompts, {a['tokens']} tokens, {a['iterations']} steps"
    align = ["---", *["---:"] * (len(keys) + len(attacked) + 2), *(["---"] if failed else [])]
    variants = [f"{name} = {v['method']} with {', '.join(f'{k}={val}' for k, val in v['settings'].items()) or 'its settings'}"
                for name, v in (summary.get("variants") or {}).items()]
    notes = ["", "Variants: " + "; ".join(variants) + "."] if variants else []
    return "\n".join([f"### {title}", "", line(columns), line(align), *rows, *notes]) + "\n"
