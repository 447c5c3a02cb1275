"""`erasekit bench eap`: the side-by-side runs and the JSON line issue 7 reads (tiny budget; figures come from benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

KEYS = {"time_ratio_fast_vs_faithful", "memory_ratio_fast_vs_faithful", "time_ratio_fast_vs_esd",
        "esr1_fast", "esr1_faithful", "psr1_fast", "psr1_faithful"}


@pytest.mark.slow  # three training subprocesses and two evaluations: 40-140 s on 2 cores (`python -m pytest -m slow`)
def test_bench_eap_runs_every_configuration_and_ends_with_the_ratios() -> None:
    cmd = [sys.executable, "-m", "erasekit", "bench", "eap", "--iterations", "2", "--images-per-class", "1", "--no-sd14"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert KEYS <= result.keys()
    assert all(result[k] > 0 for k in ("time_ratio_fast_vs_faithful", "memory_ratio_fast_vs_faithful", "time_ratio_fast_vs_esd"))
    assert all(0 <= result[k] <= 100 for k in ("esr1_fast", "esr1_faithful", "psr1_fast", "psr1_faithful"))
    for name in ("fast", "faithful", "esd-x"):  # every configuration reports its wall time and peak memory
        assert any(line.startswith(f"toy {name}") and "peak RSS" in line for line in lines), done.stdout


def test_bench_eap_refuses_bad_numbers_in_one_line() -> None:
    done = subprocess.run([sys.executable, "-m", "erasekit", "bench", "eap", "--iterations", "0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--iterations" in done.stderr


@pytest.mark.parametrize("content", [None, '{"esd-x": {"per_seed": []}}'])
def test_image_prompt_claim_refuses_an_add_to_file_it_cannot_join_before_any_work(tmp_path: Path, content: str | None) -> None:
    earlier = tmp_path / "earlier.json"
    if content is not None:
        earlier.write_text(content)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "image_prompt_claim.py"
    done = subprocess.run([sys.executable, str(script), "--add-to", str(earlier), "--seeds", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--add-to" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["--iterations", "many"], ["--iterations", "0"], ["--seeds", "0"], ["--workers", "0"]])
def test_lookalike_bar_refuses_bad_numbers_in_one_line_before_any_work(args: list[str]) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lookalike_bar.py"
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_text_geometry_ranks_every_pair_of_the_shipped_world_and_refuses_a_folder_without_a_model(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "text_geometry.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if " -> " in line]
    assert [r.split("|")[0].strip() for r in rows] == ["circle -> ring", "square -> diamond", "triangle -> arrow", "star -> cross"]
    assert all(r.count("rank ") == 4 for r in rows)
    bad = subprocess.run([sys.executable, str(script), "--text-encoder", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr


def test_lookalike_bar_pools_saved_seeds_into_spectra_with_t_intervals(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "lookalike_bar.py"

    def row(seed: int, ring: float, square: float) -> dict:
        drops = {"ring": ring, "square": square, "moon": 0.0}
        rank = 1 + sum(v > ring for v in drops.values())
        return {"erased": "circle", "partner": "ring", "partner_rank": rank, "partner_drop": ring, "met": rank <= 3,
                "own_drop": 70.0 + seed, "top": [], "drops": drops, "seed": seed}
    check = tmp_path / "check.json"  # world check's seed 0, as `erasekit world check --json` writes it
    check.write_text(json.dumps({"lookalike_pairs": {"pairs": [row(0, 40.0, 50.0)], "met": 1, "of": 1}}))
    bar = tmp_path / "bar.json"
    bar.write_text(json.dumps([{**row(1, 60.0, 10.0), "iterations": 150}]))
    done = subprocess.run([sys.executable, str(script), "--summarise", str(bar), "--summarise", str(check)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    head, spectrum = done.stdout.strip().splitlines()
    # ring: mean 50 of (40, 60), t(0.975, 1) 12.706 x stdev 14.142 / sqrt 2 = 127.06, cut at 100 points; square's mean 30 ranks it second
    assert head == "circle -> ring, ESD-x 150 iterations, seeds 0, 1: partner rank by mean drop 1 (per seed 2, 1)"
    assert spectrum == "  own 70.5 [64.1, 76.9]; ring 50.0 [-77.1, 100.0]; square 30.0 [-100.0, 100.0]; moon 0.0 [0.0, 0.0]"
    twice = subprocess.run([sys.executable, str(script), "--summarise", str(check), "--summarise", str(check)],
                           capture_output=True, text=True, timeout=120)
    assert twice.returncode == 2 and twice.stderr.count("\n") == 1 and "appears twice" in twice.stderr
    (tmp_path / "bad.json").write_text("{}")
    bad = subprocess.run([sys.executable, str(script), "--summarise", str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


def test_per_class_reads_a_comparison_and_pairs_methods_class_by_class(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "per_class.py"
    base = {"circle": 0.0, "ring": 100.0, "square": 100.0}
    kept = {"a": [{"circle": 100.0, "ring": 40.0, "square": 90.0}, {"circle": 80.0, "ring": 60.0, "square": 100.0}],
            "b": [{"circle": 100.0, "ring": 80.0, "square": 100.0}, {"circle": 90.0, "ring": 90.0, "square": 100.0}]}
    rows = []
    for method, seeds in kept.items():
        records = []
        for seed, rates in enumerate(seeds):
            (tmp_path / f"{method}-seed{seed}").mkdir()
            metrics = {"base": {"per_class": {"top-1": base}}, "erased": {"per_class": {"top-1": rates}}}
            (tmp_path / f"{method}-seed{seed}" / "eval-toy-objects.json").write_text(json.dumps({"metrics": metrics}))
            records.append({"run": f"{method}-seed{seed}", "seed": seed})
        rows.append({"method": method, "per_seed": records})
    (tmp_path / "compare.json").write_text(json.dumps({"concepts": ["circle"], "rows": rows}))
    done = subprocess.run([sys.executable, str(script), str(tmp_path), "--versus", "b:a"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # ring lost 50 (a) + 15 (b) points against square's 5 + 0: ring is the most taken, listed right after the erased class
    assert lines[0] == "| method | circle (ESR-1) | ring | square |"
    assert lines[2:5] == ["| base (no erasure) | 0.0 | 100.0 | 100.0 |", "| a | 90.0 | 50.0 | 95.0 |", "| b | 95.0 | 85.0 | 100.0 |"]
    # ring: b - a is +40 and +30, mean 35, t(0.975, 1) 12.706 x stdev 7.071 / sqrt 2 = 63.5 -> no difference on 2 seeds
    assert lines[5:8] == ["b - a, paired over 2 seeds:", "  circle: +5.0 [-58.5, +68.5] no difference", "  ring: +35.0 [-28.5, +98.5] no difference"]
    bad = subprocess.run([sys.executable, str(script), str(tmp_path), "--versus", "b:c"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --versus b:c") and bad.stderr.count("\n") == 1
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "erasekit compare" in missing.stderr and "Traceback" not in missing.stderr
