"""The comparison as a Markdown table (compare.md and the terminal): rates per method, attack columns, notes."""

from __future__ import annotations

from typing import Any


def _cell(value: Any) -> str:
    return "–" if value is None else f"{value:.1f}" if isinstance(value, (int, float)) else str(value)


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
    keys = list(dict.fromkeys(k for row in [summary["base"], *summary["rows"]] for values in row["metrics"].values() for k in values))
    attacked = attack_columns(summary)
    failed = any(_note(row) for row in summary["rows"])
    columns = ["method", *keys, *(title for title, _, _ in attacked), "wall s", "peak MiB", *(["note"] if failed else [])]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    def metrics(row: dict[str, Any]) -> list[str]:
        merged = {k: v for values in row["metrics"].values() for k, v in values.items()}
        return [_cell(merged.get(k)) for k in keys]

    def attack(row: dict[str, Any], base: bool = False) -> list[str]:
        found = row.get("attack", {})
        return [_cell(found.get(c, {}).get("base_rate" if base and key == "no_attack_rate" else key)) for _, c, key in attacked]

    rows = [line(["base (no erasure)", *metrics(summary["base"]), *attack(summary["base"], base=True), "–", "–", *([""] if failed else [])])]
    for row in summary["rows"]:
        note = [_note(row)] if failed else []
        rows.append(line([row["method"], *metrics(row), *attack(row), _cell(row.get("wall_s")), _cell(row.get("peak_rss_mib")), *note]))
    title = f"{', '.join(summary['concepts'])} erased from {summary['model']}; suites: {', '.join(summary['suites'])}; seed {summary['seed']}"
    if summary.get("attack"):
        a = summary["attack"]
        title += f"; attack: {a['n_prompts']} prompts, {a['tokens']} tokens, {a['iterations']} steps"
    align = ["---", *["---:"] * (len(keys) + len(attacked) + 2), *(["---"] if failed else [])]
    return "\n".join([f"### {title}", "", line(columns), line(align), *rows]) + "\n"
