"""The HTML/Markdown report: tables, embedded grids and plots, provenance; rendered in headless Chromium (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erasekit.errors import ErasekitError
from erasekit.eval.report import history_plot, load_run, markdown_table, metrics_tables, write_report
from erasekit.eval.runner import evaluate
from test_eval import FAST, judge_dir, run_dir  # noqa: F401  (fixtures)


@pytest.fixture
def evaluated(run_dir: Path, judge_dir: Path, tmp_path: Path) -> Path:  # noqa: F811
    """A run folder evaluated with toy-objects on the tiny model."""
    evaluate(str(run_dir), "toy-objects", images_per_class=2, cache_dir=tmp_path / "cache", judge=str(judge_dir), command="erasekit evaluate run", **FAST)
    return run_dir


def test_report_embeds_table_grid_history_and_provenance(evaluated: Path, tmp_path: Path) -> None:
    html_path, md_path = write_report([evaluated], tmp_path / "report.html")
    text = html_path.read_text()
    assert "<table>" in text and "ESR-1" in text and "PSR-5" in text
    assert text.count('src="data:image/png;base64,') >= 2  # the grid and the history plot
    assert "erasekit erase -c circle" in text and "erasekit evaluate run" in text and '"seed": 0' in text
    assert "src=\"http" not in text and "href=" not in text  # self-contained
    md = md_path.read_text()
    assert "| run | model | ESR-1 |" in md and "| run | base |" in md


def test_markdown_table_layout() -> None:
    assert markdown_table(["run", "model", "ESR-1"], [["a", "base", "1.0"]]) == "| run | model | ESR-1 |\n| --- | --- | ---: |\n| a | base | 1.0 |"


def test_metrics_table_puts_comparison_on_the_erased_row(evaluated: Path) -> None:
    columns, rows = metrics_tables([load_run(evaluated)])["toy-objects"]
    assert columns[:6] == ["run", "model", "ESR-1", "ESR-5", "PSR-1", "PSR-5"]
    fid_col = columns.index("FID vs base")
    assert rows[0][1] == "base" and rows[0][fid_col] == "–"
    assert rows[1][1] == "esd-x ✕ circle" and rows[1][fid_col] != "–"


def test_history_plot_is_a_png(run_dir: Path) -> None:  # noqa: F811
    png = history_plot(json.loads((run_dir / "history.json").read_text()))
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    assert history_plot({"steps": [], "search": None}) is None


def test_report_refuses_bad_input(tmp_path: Path, run_dir: Path) -> None:  # noqa: F811
    with pytest.raises(ErasekitError, match="must end in .html"):
        write_report([run_dir], tmp_path / "r.txt")
    with pytest.raises(ErasekitError, match="none of the runs has been evaluated"):
        write_report([run_dir], tmp_path / "r.html")
    with pytest.raises(ErasekitError, match="no run folder"):
        write_report([tmp_path / "missing"], tmp_path / "r.html")


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed; run scripts/install_chromium.sh")
def test_report_renders_in_headless_chromium(evaluated: Path, tmp_path: Path) -> None:
    html_path, _ = write_report([evaluated], tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    profile = tempfile.mkdtemp()
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,1600",
           "--hide-scrollbars", f"file://{html_path.resolve()}"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120, env={**os.environ, "HOME": profile})
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1200)
    # the table header is filled #e8e8f0; the grid holds generated (non-white, non-grey) pixels
    header = np.all(pixels == (232, 232, 240), axis=2)
    assert header.sum() > 500, "the metrics table's header is not visible"
    colourful = (pixels.max(2) - pixels.min(2)) > 40
    assert colourful.sum() > 1000, "no image grid is visible"
