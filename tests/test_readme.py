"""Every `erasekit` command the README shows runs, as written, on the shipped toy model."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.models import toy_dir

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.skipif(not (toy_dir() / "pipeline" / "model_index.json").exists(), reason="the toy model is not shipped in this checkout")


def readme_commands() -> list[list[str]]:
    """`erasekit ...` commands from the README's bash blocks (also those chained after `&&`)."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split(" #")[0])
                if words[:1] == ["erasekit"]:
                    commands.append(words[1:])
    return commands


def test_readme_shows_the_demo_and_the_core_commands() -> None:
    names = [c[0] for c in readme_commands()]
    assert names[0] == "demo" and {"erase", "generate", "evaluate", "report", "world"} <= set(names)


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command at full scale, as a new user runs them (about 20 min on a 2-core AMD machine: the slow suite)."""
    run_readme_commands(tmp_path, monkeypatch)


def test_every_readme_command_runs_at_a_small_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every command as written, with the toy presets cut to 2 steps and every evaluation and world check to a few images.

    The commands, their flags and every file they write are the README's; only the amount of work is smaller, so the
    default suite stays within its time (the full-scale run is the slow test above).
    """
    import erasekit.eval.runner as runner
    import erasekit.world.check as check
    from erasekit.methods import registry

    for spec in registry().values():
        for preset in spec.presets.values():
            if "iterations" in preset:
                monkeypatch.setitem(preset, "iterations", 2)
    full_evaluate, full_check = runner.evaluate, check.check_world
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: full_evaluate(*a, **{**k, "images_per_class": 2}))
    monkeypatch.setattr(check, "check_world", lambda pipeline_dir=None, judge_dir=None, images_per_class=20, steps=25, *a, **k:
                        full_check(pipeline_dir, judge_dir, 1, 2, *a, **{**k, "heldout_images": 20}))
    run_readme_commands(tmp_path, monkeypatch)


def run_readme_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the README's commands in order in ``tmp_path`` and check what they wrote and printed."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    runner = CliRunner()
    outputs = {}
    for args in readme_commands():
        result = runner.invoke(app, args)
        assert result.exit_code == 0, f"erasekit {' '.join(args)} failed:\n{result.output[-2000:]}"
        outputs[" ".join(args)] = result.output
    assert (tmp_path / "runs" / "demo" / "report.html").exists()
    demo = next(text for command, text in outputs.items() if command.startswith("demo"))
    assert re.search(r"expected time on this machine: about \d+ min", demo)  # told before it starts
    assert demo.index("expected time") < demo.index("wrote")
    assert (tmp_path / "runs" / "no-circle" / "delta.safetensors").exists()
    assert (tmp_path / "runs" / "report.html").stat().st_size > 10_000
    check = json.loads(outputs["world check --json --no-pairs"].strip().splitlines()[-1])
    assert {"judge_accuracy", "object_top1", "seconds_per_64_images"} <= set(check)
