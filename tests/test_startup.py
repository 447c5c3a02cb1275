"""Fast to start, clear while running: no heavy import before a command needs it, quiet model loading, log-friendly
progress, an immediate answer to Ctrl-C, and run folders with the user's usual permissions."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from typer.testing import CliRunner

from erasekit.cli import app
from erasekit.run_display import LineProgress, progress_bar

HEAVY = ("torch", "diffusers", "transformers", "sklearn", "matplotlib")
# prints the heavy modules loaded when the process ends (after the command has run and exited)
PROBE = (f"import atexit, sys; atexit.register(lambda: print('HEAVY', sorted(m for m in {HEAVY} if m in sys.modules)));"
         "from erasekit.cli import main; main()")


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_importing_the_cli_loads_no_heavy_library() -> None:
    code = f"import sys, erasekit.cli; print(sorted(m for m in {HEAVY} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("args, code, expected", [
    (["--help"], 0, "methods"),
    (["methods"], 0, "eap-pgd"),
    (["erase", "--method", "eapp", "-c", "circle", "--out", "never-written"], 2, "error: unknown method 'eapp'; choose one of: advunlearn, age, all-but-one, ca,"),
])
def test_help_methods_and_a_misspelt_method_answer_without_importing_torch(args: list[str], code: int, expected: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], env=_env(), capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert expected in proc.stdout + proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "never-written.partial").exists()


def test_the_catalog_is_the_registry_and_names_real_config_classes_and_fits() -> None:
    from erasekit.families import families
    from erasekit.methods import registry
    from erasekit.methods.specs import ALL_FAMILIES

    assert tuple(families()) == ALL_FAMILIES, "`erasekit methods` shows the families by these names, without importing them"
    for name, spec in registry().items():
        assert dataclasses.is_dataclass(spec.config_class) and callable(spec.fit), name
        fields = {f.name for f in dataclasses.fields(spec.config_class)}
        for budget, preset in spec.presets.items():
            assert set(preset) <= fields, f"{name} preset {budget} sets unknown fields {set(preset) - fields}"


def test_loading_a_model_prints_no_library_notices_or_bars_and_keeps_errors(caplog: pytest.LogCaptureFixture) -> None:
    # a fresh process: transformers prints its torchvision notice once per process, on the first import that triggers it
    code = "from erasekit.models import load_pipeline, load_tokenizer; load_tokenizer('toy'); load_pipeline('toy'); print('loaded')"
    proc = subprocess.run([sys.executable, "-c", code], env={**_env(), "TRANSFORMERS_VERBOSITY": "", "DIFFUSERS_VERBOSITY": ""},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "loaded", proc.stderr[-2000:]
    for noise in ("requires torchvision", "Loading pipeline components", "Loading weights", "it/s]"):
        assert noise not in proc.stderr, proc.stderr[-2000:]

    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    from erasekit.models import quiet_loading

    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (tlog, dlog)]
    with quiet_loading():
        tlog.get_logger("transformers.test").error("an error stays visible")
        tlog.get_logger("transformers.test").warning("a notice is hidden")
    assert [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (tlog, dlog)] == before, "the switches are put back"
    assert "an error stays visible" in caplog.text and "a notice is hidden" not in caplog.text


def test_progress_in_a_log_file_is_tens_of_plain_lines() -> None:
    log = io.StringIO()
    console = Console(file=log, width=80)  # a file: not a terminal
    with progress_bar(console, "info") as bar:
        assert isinstance(bar, LineProgress)
        task = bar.add_task("eap ✕ circle", total=1000, info="preparing")
        for step in range(1, 1001):
            bar.update(task, completed=step, info=f"erase {1 / step:.4g} preserve 0.05 most sensitive: a red ring in a watercolour style")
    lines = log.getvalue().splitlines()
    assert 10 <= len(lines) <= 30, lines
    assert all(line.startswith("eap ✕ circle: ") for line in lines)
    assert lines[-1].startswith("eap ✕ circle: 1000/1000 (100%)") and "watercolour style" in lines[-1]
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_progress_of_unknown_length_prints_at_most_one_line_per_interval() -> None:
    now = [0.0]
    log = io.StringIO()
    with LineProgress(console=Console(file=log, width=80), every_s=30.0, get_time=lambda: now[0]) as bar:
        task = bar.add_task("export", total=None)
        for second in range(0, 100):
            now[0] = float(second)
            bar.update(task, completed=second)
    assert [line.split(":")[1].split(",")[0].strip() for line in log.getvalue().splitlines()] == ["0", "30", "60", "90"]


def test_progress_on_an_80_column_terminal_keeps_one_line_per_task_with_counts_and_times() -> None:
    console = Console(file=io.StringIO(), force_terminal=True, width=80, color_system=None)
    bar = progress_bar(console, "info")
    long = bar.add_task("eap ✕ a photo of a very long concept name", total=1000, info="erase 0.01234 preserve 0.0567 most sensitive: a red ring")
    bar.add_task("base", total=64, info="")
    bar.update(long, completed=500)
    console.print(bar.make_tasks_table(bar.tasks))
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 2 and all(len(line) <= 80 for line in lines), lines
    assert "500/1000" in lines[0] and "0/64" in lines[1] and re.search(r"\d:\d\d:\d\d", lines[0]) and "erase 0.0" in lines[0]


@pytest.mark.parametrize("period, done, saved, between_steps, step", [
    (1, 0, 0, True, 1),  # before the first step
    (1, 6, 0, False, 7),  # during step 7
    (1, 6, 0, True, 6),  # while step 6 reports its progress: its after_step stops the run
    (1, 6, 6, True, 7),  # step 6 is checkpointed already
    (4, 5, 0, False, 8),  # rollouts shared by 4 steps: the next boundary
    (4, 8, 0, True, 8),
    (4, 9, 8, False, 12),
    (4, 18, 16, False, 20),  # the last step
])
def test_the_first_ctrl_c_says_at_once_which_step_it_finishes(period: int, done: int, saved: int, between_steps: bool, step: int,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from erasekit.methods.trainer import _defer_ctrl_c

    run = SimpleNamespace(interrupted=False, rank=0, done=done, saved=saved, between_steps=between_steps, checkpoint=object(),
                          config=SimpleNamespace(iterations=20))
    # a process started in the background of a non-interactive shell (as CI may run pytest) inherits SIGINT ignored;
    # the trainer's second Ctrl-C restores the handler it found, so give it Python's own, as a terminal would
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    restore = _defer_ctrl_c(run, period)  # type: ignore[arg-type]
    try:
        signal.raise_signal(signal.SIGINT)
        assert run.interrupted, "the first Ctrl-C only asks the run to stop at the next boundary"
        assert capsys.readouterr().err.strip() == f"finishing step {step} to save a checkpoint; Ctrl-C again to stop now"
        with pytest.raises(KeyboardInterrupt):  # the second one stops at once
            signal.raise_signal(signal.SIGINT)
    finally:
        restore()
        signal.signal(signal.SIGINT, outer)


def test_sigint_to_a_real_erase_is_acknowledged_before_the_step_finishes_and_names_the_checkpointed_step(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    out = tmp_path / "run"
    args = ["erase", "--model", str(tiny_dir), "-c", "circle", "--method", "esd-x", "--iterations", "60", "--ddim-steps", "3", "--lr", "1e-3",
            "--checkpoint-every", "0", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", "from erasekit.cli import main; main()", *args], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the time estimate comes after the first few model steps: the run is mid-loop
        seen.append(line)
        if line.startswith("expected:"):
            break
    proc.send_signal(signal.SIGINT)
    lines = [*seen, *proc.communicate(timeout=120)[1].splitlines()]
    notices = [i for i, line in enumerate(lines) if line.startswith("finishing step ")]
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert proc.returncode == 2 and len(notices) == 1 and len(errors) == 1 and notices[0] < errors[0], "".join(lines)
    with safe_open(str(tmp_path / "run.partial" / "checkpoint.safetensors"), "pt") as fh:
        step = json.loads(fh.metadata()["state"])["step"]
    assert lines[notices[0]].strip() == f"finishing step {step} to save a checkpoint; Ctrl-C again to stop now"


def test_a_run_folder_gets_the_users_usual_permissions_and_a_log_of_plain_progress_lines(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    previous = os.umask(0o022)
    try:
        res = CliRunner().invoke(app, ["erase", "--model", str(tiny_dir), "-c", "circle", "--method", "esd-x", "--iterations", "40",
                                       "--ddim-steps", "2", "--lr", "1e-3", "--out", str(out)])
    finally:
        os.umask(previous)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(out.stat().st_mode) == 0o755, oct(out.stat().st_mode)
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in out.iterdir()), [oct(f.stat().st_mode) for f in out.iterdir()]
    progress = [line for line in res.output.splitlines() if line.startswith("esd-x ✕ circle: ")]
    assert 10 <= len(progress) <= 25 and progress[-1].startswith("esd-x ✕ circle: 40/40 (100%)"), res.output
