"""No traceback anywhere (issue 22, item 1): each case a new user hit ends in one `error:` line and exit code 2,
before any model loads, and leaves nothing behind; values that would train but make no sense are refused with
their range; no record is written with a NaN in it; a run that failed before its first checkpoint never blocks the next."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from conftest import Loaded
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.result import ErasureResult
from erasekit.runs import partial_dir, write_run

runner = CliRunner()
BIG = "99999999999999999999"


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of an erased toy model (a one-tensor delta): enough for evaluate and attack to check their inputs."""
    run = tmp_path_factory.mktemp("erased") / "run"
    run.mkdir()
    ErasureResult("esd-x", ("circle",), {"unet.x": torch.zeros(1)}, base_model_id="toy").save(run / "delta.safetensors")
    (run / "run.json").write_text(json.dumps({"model": "toy"}))
    return run


def _refused(args: list[str], folder: Path) -> str:
    """Run the command; it must print one `error:` line, exit 2 and leave ``folder`` empty. Returns the line."""
    res = runner.invoke(app, args)
    assert not isinstance(res.exception, Loaded), f"{args} got as far as loading the model"
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    assert list(folder.iterdir()) == [], list(folder.iterdir())
    return lines[0]


ERASE = ["erase", "--model", "toy", "--concept", "circle", "--iterations", "1", "--out", "{out}/sd"]
CLOSED = ["erase", "--model", "toy", "--concept", "circle", "--out", "{out}/sd"]  # UCE and RECE have no --iterations
CASES = {
    "erase seed -1": (ERASE + ["--seed", "-1"], "--seed must be a whole number in 0 .. 2**63 - 1"),
    "erase seed 1e20": (ERASE + ["--seed", BIG], "--seed must be a whole number in 0 .. 2**63 - 1"),
    "generate seed 1e20": (["generate", "--model", "toy", "-p", "circle", "--seed", BIG, "--out", "{out}/g.png"], "--seed must be a whole number"),
    "evaluate seed 1e20": (["evaluate", "{run}", "--seed", BIG, "--json", "{out}/e.json"], "--seed must be a whole number"),
    "attack seed 1e20": (["attack", "{run}", "-c", "circle", "--seed", BIG, "--out", "{out}/a"], "--seed must be a whole number"),
    "gumbel-lr -1": (ERASE + ["--gumbel-lr", "-1"], "--gumbel-lr must be a positive finite number"),
    "gumbel-lr nan": (ERASE + ["--gumbel-lr", "nan"], "--gumbel-lr must be a finite number"),
    "gumbel-lr 0": (ERASE + ["--gumbel-lr", "0"], "--gumbel-lr must be a positive finite number"),
    "gumbel-lr 1e30": (ERASE + ["--gumbel-lr", "1e30"], "--gumbel-lr must be > 0 and <= 1"),
    "evaluate steps 100000": (["evaluate", "{run}", "--steps", "100000", "--json", "{out}/e.json"], "--steps must be >= 1 and <= 1000"),
    "attack steps 100000": (["attack", "{run}", "-c", "circle", "--steps", "100000", "--out", "{out}/a"], "--steps must be >= 1 and <= 1000"),
    "world render seed -1": (["world", "render", "--seed", "-1", "--out", "{out}/r.png"], "--seed must be a whole number in 0 .. 2**63 - 1"),
    "lr 1e30": (ERASE + ["--lr", "1e30"], "--lr must be > 0 and <= 1"),
    "preserve-weight 1e30": (ERASE + ["--preserve-weight", "1e30"], "--preserve-weight must be >= 0 and <= 1000"),
    "start-guidance 1e30": (ERASE + ["--start-guidance", "1e30"], "--start-guidance must be >= 0 and <= 50"),
    "negative-guidance -1": (ERASE + ["--negative-guidance=-1"], "--negative-guidance must be >= 0 and <= 50"),
    "lora-rank -1": (ERASE + ["--lora-rank", "-1"], "--lora-rank must be >= 1 and <= 1024"),
    "iterations 1e12": (ERASE + ["--iterations", "1e12"], "--iterations expects int, got '1e12'"),
    "iterations 10**12": (ERASE + ["--iterations", "1000000000000"], "--iterations must be >= 1 and <= 100000"),
    "ca guidance nan": (ERASE + ["--method", "ca", "--guidance", "nan"], "--guidance must be a finite number"),
    "uce lam inf": (ERASE[:-4] + ["--out", "{out}/sd", "--method", "uce", "--lam", "inf"], "--lam must be a finite number"),
    "generate guidance nan": (["generate", "--model", "toy", "-p", "circle", "--guidance", "nan", "--out", "{out}/g.png"], "--guidance must be >= 0 and <= 50"),
    "generate guidance -3": (["generate", "--model", "toy", "-p", "circle", "--guidance=-3", "--out", "{out}/g.png"], "--guidance must be >= 0 and <= 50"),
    "evaluate guidance nan": (["evaluate", "{run}", "--guidance", "nan", "--json", "{out}/e.json"], "--guidance must be a finite number"),
    "evaluate guidance -1": (["evaluate", "{run}", "--guidance=-1", "--json", "{out}/e.json"], "--guidance must be >= 0 and <= 50"),
    "attack guidance nan": (["attack", "{run}", "-c", "circle", "--guidance", "nan", "--out", "{out}/a"], "--guidance must be a finite number"),
    "attack guidance -1": (["attack", "{run}", "-c", "circle", "--guidance=-1", "--out", "{out}/a"], "--guidance must be >= 0 and <= 50"),
    # UCE and RECE's closed-form weights: positive, and small enough that no term swamps the others
    "uce lam 0": (CLOSED + ["--method", "uce", "--lam", "0"], "--lam must be >= 1e-06 and <= 1e+06"),
    "uce lam 1e30": (CLOSED + ["--method", "uce", "--lam", "1e30"], "--lam must be >= 1e-06 and <= 1e+06"),
    "uce erase-scale 0": (CLOSED + ["--method", "uce", "--erase-scale", "0"], "--erase-scale must be > 0 and <= 1e+06"),
    "uce erase-scale 1e30": (CLOSED + ["--method", "uce", "--erase-scale", "1e30"], "--erase-scale must be > 0 and <= 1e+06"),
    "uce preserve-scale 1e30": (CLOSED + ["--method", "uce", "--preserve-scale", "1e30"], "--preserve-scale must be <= 1e+06"),
    "rece lam -1": (CLOSED + ["--method", "rece", "--lam=-1"], "--lam must be >= 1e-06 and <= 1e+06"),
    "rece erase-scale -1": (CLOSED + ["--method", "rece", "--erase-scale=-1"], "--erase-scale must be > 0 and <= 1e+06"),
    "rece reg-scale 0": (CLOSED + ["--method", "rece", "--reg-scale", "0"], "--reg-scale must be >= 1e-06 and <= 1e+06"),
    "rece reg-scale 1e30": (CLOSED + ["--method", "rece", "--reg-scale", "1e30"], "--reg-scale must be >= 1e-06 and <= 1e+06"),
    "rece start-lam 1e30": (CLOSED + ["--method", "rece", "--start-lam", "1e30"], "--start-lam must be >= 1e-06 and <= 1e+06"),
    "rece rounds 10**6": (CLOSED + ["--method", "rece", "--rounds", "1000000"], "--rounds must be >= 1 and <= 20"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_case_is_one_line_and_exit_2_before_the_model_loads(case: str, tmp_path: Path, run_folder: Path, no_model_load: None) -> None:
    args, message = CASES[case]
    out = tmp_path / "out"
    out.mkdir()
    line = _refused([a.replace("{out}", str(out)).replace("{run}", str(run_folder)) for a in args], out)
    assert message in line, line


@pytest.mark.parametrize("method, setting, value, message", [
    ("uce", "lam", 0.0, "lam must be >= 1e-06 and <= 1e+06"),
    ("uce", "erase_scale", 0.0, "erase_scale must be > 0 and <= 1e+06"),
    ("rece", "reg_scale", 1e30, "reg_scale must be >= 1e-06 and <= 1e+06"),
    ("rece", "start_preserve_scale", 1e30, "start_preserve_scale must be <= 1e+06"),
])
def test_closed_form_weights_out_of_range_name_the_keyword_in_python(method: str, setting: str, value: float, message: str) -> None:
    from erasekit.methods import get_method, make_config

    with pytest.raises(ErasekitError, match=re.escape(message)):
        make_config(get_method(method), **{setting: value})
    make_config(get_method(method), preserve_scale=-1.0)  # negative: the old code's max(0.1, 1/|retain|), still allowed


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be >= 1 and <= 20"),
    (["--seeds", "100000"], "--seeds must be >= 1 and <= 20"),
    (["--iterations", "0"], "--iterations must be >= 1 and <= 100000"),
    (["--iterations", str(10**12)], "--iterations must be >= 1 and <= 100000"),
    (["--images-per-class", "1000000"], "--images-per-class must be >= 1 and <= 10000"),
    (["--sd14-steps", "1"], "--sd14-steps must be >= 2 and <= 100000"),
])
def test_bench_eap_refuses_sizes_out_of_range_before_any_run(args: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.bench

    def start(*a: Any, **k: Any) -> Any:
        raise Loaded

    monkeypatch.setattr(erasekit.bench, "measure", start)  # a worker process would load a model
    assert message in _refused(["bench", "eap", *args], tmp_path)


def test_world_check_refuses_a_folder_that_is_no_pipeline_before_the_judge_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.world.check

    def load(*a: Any, **k: Any) -> Any:
        raise Loaded

    monkeypatch.setattr(erasekit.world.check, "load_toy_judge", load)
    monkeypatch.setattr(erasekit.world.check, "load_toy_pipeline", load)
    line = _refused(["world", "check", "--pipeline", str(tmp_path)], tmp_path)
    assert f"no pipeline at {tmp_path}" in line and "erasekit world train" in line


def test_a_refused_seed_leaves_nothing_so_the_same_command_says_the_same_and_resume_has_nothing(tmp_path: Path, no_model_load: None) -> None:
    args = [a.replace("{out}", str(tmp_path)) for a in ERASE + ["--seed", "-1"]]
    first, second = _refused(args, tmp_path), _refused(args, tmp_path)
    assert first == second and "resume" not in second
    assert "no interrupted run" in _refused(["erase", "--resume", str(tmp_path / "sd")], tmp_path)


# ---- a .partial folder from a run that failed before its first checkpoint ----

def _partial(out: Path, pid: int, checkpoint: bool = False) -> Path:
    work = partial_dir(out)
    work.mkdir(parents=True)
    request = {"model": "toy", "method": "eap", "concepts": ["circle"], "preserve": [], "config": {"seed": 0}, "pid": pid, "host": platform.node()}
    (work / "request.json").write_text(json.dumps(request))
    if checkpoint:
        (work / "checkpoint.safetensors").write_bytes(b"")
    return work


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_partial_folder_without_a_checkpoint_never_blocks_a_new_run(tmp_path: Path, no_model_load: None) -> None:
    out = tmp_path / "sd"
    work = _partial(out, _dead_pid())
    res = runner.invoke(app, ["erase", "--model", "toy", "-c", "circle", "--out", str(out)])
    assert isinstance(res.exception, Loaded), res.output  # not blocked: it went on to load the model
    assert not work.exists() and "nothing to resume" in res.output


@pytest.mark.parametrize(("checkpoint", "alive", "message"), [(True, False, "an interrupted run is in"), (False, True, "is working in")])
def test_a_partial_folder_that_can_resume_or_is_in_use_is_kept(tmp_path: Path, no_model_load: None, checkpoint: bool, alive: bool, message: str) -> None:
    out = tmp_path / "sd"
    work = _partial(out, os.getppid() if alive else _dead_pid(), checkpoint)
    res = runner.invoke(app, ["erase", "--model", "toy", "-c", "circle", "--out", str(out)])
    assert res.exit_code == 2 and message in res.output and (work / "request.json").is_file(), res.output


@pytest.mark.parametrize("failure", [RuntimeError("a library's bug"), KeyboardInterrupt()])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_partial_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: BaseException) -> None:
    import erasekit.api
    import erasekit.models

    monkeypatch.setattr(erasekit.models, "load_pipeline", lambda *a, **k: SimpleNamespace(device=torch.device("cpu")))

    def fail(*args: Any, **kwargs: Any) -> Any:
        assert (partial_dir(tmp_path / "sd") / "request.json").is_file()
        raise failure

    monkeypatch.setattr(erasekit.api, "erase", fail)
    runner.invoke(app, ["erase", "--model", "toy", "-c", "circle", "--iterations", "1", "--out", str(tmp_path / "sd")])
    assert list(tmp_path.iterdir()) == []


def test_a_recorded_setting_this_version_refuses_says_to_start_again(tmp_path: Path) -> None:
    out = tmp_path / "sd"
    work = _partial(out, _dead_pid(), checkpoint=True)
    request = json.loads((work / "request.json").read_text())
    (work / "request.json").write_text(json.dumps({**request, "config": {"seed": -1}}))
    res = runner.invoke(app, ["erase", "--resume", str(out)])
    assert res.exit_code == 2 and "cannot resume: its recorded settings are refused (--seed must be" in res.output and "delete that folder" in res.output


# ---- no record is written with a NaN in it ----

def test_a_run_whose_losses_went_nan_writes_no_run_folder(tmp_path: Path) -> None:
    result = ErasureResult("esd-x", ("circle",), {"unet.x": torch.zeros(1)}, history=({"step": 1, "erase_loss": float("nan")},))
    with pytest.raises(ErasekitError, match=r"history.json would hold a non-finite number at steps.0.erase_loss; nothing was written: the training diverged"):
        write_run(tmp_path / "run", result, "toy", ["erasekit", "erase"])
    assert list(tmp_path.iterdir()) == []
