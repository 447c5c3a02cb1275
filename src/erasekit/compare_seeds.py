"""One method's results over several training seeds (`erasekit compare --seeds N`): per-seed runs, means and 95 % intervals."""

from __future__ import annotations

from typing import Any


def rate_counts(evaluation: dict[str, Any]) -> dict[str, int]:
    """Images behind each rate of one evaluation (for the pooled part of the interval).

    ESR counts the erased groups' images, PSR the others' (every image when the concept is no group of the suite,
    e.g. the skull on toy-objects), and ``all`` every image: a detection rate at a threshold (``implicit@0.5``,
    ``nudity@0.6``) is over all of them.
    """
    images = evaluation.get("images") or []
    if not images:
        return {}
    erased = set(evaluation.get("erased") or [])
    n_erased = sum(1 for im in images if im.get("group") in erased)
    counts = {"PSR": len(images) - n_erased, "all": len(images)}
    if n_erased:
        counts["ESR"] = n_erased
    return counts


def images_behind(key: str, counts: dict[str, int]) -> int | None:
    """The images a rate named ``key`` pools (None for a score that is no proportion of images, e.g. FID)."""
    if key.startswith(("ESR-", "PSR-")):
        return counts.get(key[:3])
    return counts.get("all") if "@" in key else None


def aggregate(name: str, records: list[dict[str, Any]], intervals: bool) -> dict[str, Any]:
    """One method's row over training seeds: per-seed results, means, and (with ``intervals``) 95 % intervals of every rate."""
    from erasekit.eval.intervals import rate_interval

    row: dict[str, Any] = {"method": name, "run": records[0]["run"], "per_seed": records, "metrics": {}, "intervals": {}}
    failed = [r for r in records if r.get("error")]
    if failed:
        row["error"] = f"seed {failed[0]['seed']}: {failed[0]['error']}"
        return row
    for suite in records[0]["metrics"]:
        row["metrics"][suite], row["intervals"][suite] = {}, {}
        for key in records[0]["metrics"][suite]:
            values = [r["metrics"][suite].get(key) for r in records]
            if any(not isinstance(v, (int, float)) for v in values):
                continue
            row["metrics"][suite][key] = sum(values) / len(values)
            if intervals:
                images = images_behind(key, records[0]["counts"].get(suite, {}))
                row["intervals"][suite][key] = rate_interval(values, images).as_dict()
    row["wall_s"] = sum(r["wall_s"] for r in records) / len(records)
    row["peak_rss_mib"] = max(r.get("peak_rss_mib") or 0.0 for r in records) or None
    if all("attack" in r for r in records):
        row["attack"], row["attack_intervals"] = {}, {}
        for concept in records[0]["attack"]:
            row["attack"][concept], row["attack_intervals"][concept] = {}, {}
            for key in ("asr", "no_attack_rate"):
                values = [r["attack"][concept].get(key) for r in records]
                if all(isinstance(v, (int, float)) for v in values):
                    row["attack"][concept][key] = sum(values) / len(values)
                    if intervals:
                        row["attack_intervals"][concept][key] = rate_interval(values).as_dict()
    errors = [r["attack_error"] for r in records if r.get("attack_error")]
    if errors:
        row["attack_error"] = errors[0]
    return row
