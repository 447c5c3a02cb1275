"""Checkpoints: a run killed with SIGKILL (or Ctrl-C) and resumed gives the uninterrupted run's delta, bitwise."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import erasekit
from conftest import DIFFUSION_METHODS, kill_at_first_checkpoint, tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.methods.checkpoint import CheckpointSpec
from erasekit.result import load_result

ARGS = ["-c", "circle", "--method", "eap", "--k", "8", "--n-centres", "3", "--iterations", "40", "--ddim-steps", "20",
        "--lr", "1e-3", "--checkpoint-every", "4"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from erasekit.cli import main; main()", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_sigkilled_run_resumes_to_the_same_delta(tiny_dir: Path, tmp_path: Path, words_file: Path) -> None:
    common = ["erase", "--model", str(tiny_dir), "--concept-space", str(words_file), *ARGS]
    full = subprocess.run(_cli(*common, "--out", str(tmp_path / "full")), env=_env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    killed_out = tmp_path / "killed"
    kill_at_first_checkpoint(_cli(*common, "--out", str(killed_out)), killed_out, _env())

    resumed = subprocess.run(_cli("erase", "--resume", str(killed_out)), env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "killed.partial").exists()
    a = load_result(tmp_path / "full" / "delta.safetensors").delta
    b = load_result(killed_out / "delta.safetensors").delta
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _settings(words: Path) -> dict:
    return dict(method="eap", concept_space=str(words), k=8, n_centres=3, iterations=10, ddim_steps=3, lr=1e-3, rollout_reuse=2)


def test_ctrl_c_saves_a_checkpoint_and_resume_is_exact(tmp_path: Path, words_file: Path) -> None:
    reference = erasekit.erase(tiny_pipeline(), "circle", **_settings(words_file))
    spec = CheckpointSpec(tmp_path / "work", every=0)

    def interrupt(step: int, total: int, record: dict) -> None:
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(ErasekitError, match="checkpoint of step 6"):
        erasekit.erase(tiny_pipeline(), "circle", progress=interrupt, checkpoint=spec, **_settings(words_file))
    resumed = erasekit.erase(tiny_pipeline(), "circle", checkpoint=spec, **_settings(words_file))
    assert all(torch.equal(reference.delta[k], resumed.delta[k]) for k in reference.delta)
    assert [h["step"] for h in resumed.history if "step" in h] == list(range(1, 11))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path: Path, words_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("erasekit.checks.MAX_LR", 1e13)  # validation refuses lr 1e12; the trainer's own guard is what is tested here
    spec = CheckpointSpec(tmp_path / "work", every=2)
    settings = {**_settings(words_file), "lr": 1e12, "rollout_reuse": 1}
    with pytest.raises(ErasekitError, match="the loss became") as info:
        erasekit.erase(tiny_pipeline(), "circle", checkpoint=spec, **settings)
    assert "\n" not in str(info.value)


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path, words_file: Path) -> None:
    spec = CheckpointSpec(tmp_path / "work", every=2)
    erasekit.erase(tiny_pipeline(), "circle", checkpoint=CheckpointSpec(spec.folder, 2), **{**_settings(words_file), "iterations": 4})
    with pytest.raises(ErasekitError, match="other settings"):
        erasekit.erase(tiny_pipeline(), "circle", checkpoint=spec, **_settings(words_file))


def test_sigint_to_a_real_erase_saves_a_checkpoint_and_says_how_to_resume(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from erasekit.models import load_pipeline

    out = tmp_path / "run"
    settings = ["-c", "circle", "--method", "esd-x", "--iterations", "60", "--ddim-steps", "3", "--lr", "1e-3"]
    # --checkpoint-every 0: the only checkpoint is the one Ctrl-C writes
    proc = subprocess.Popen(_cli("erase", "--model", str(tiny_dir), *settings, "--checkpoint-every", "0", "--out", str(out)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:  # the time estimate is printed after the first few model steps: the run is mid-loop
        seen.append(line)
        if line.startswith("expected:"):
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=120)[1]
    errors = [line for line in (*seen, *rest.splitlines()) if line.startswith("error:")]
    assert proc.returncode == 2, "".join(seen) + rest
    assert len(errors) == 1 and "interrupted after step" in errors[0] and f"erasekit erase --resume {out}" in errors[0], errors
    ckpt = tmp_path / "run.partial" / "checkpoint.safetensors"
    with safe_open(str(ckpt), "pt") as fh:
        step = json.loads(fh.metadata()["state"])["step"]
    assert 4 <= step < 60 and f"step {step}" in errors[0] and not out.exists()

    resumed = subprocess.run(_cli("erase", "--resume", str(out)), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    b = load_result(out / "delta.safetensors").delta
    # the uninterrupted run (the CLI and this call give the same delta bitwise on one thread)
    reference = erasekit.erase(load_pipeline(str(tiny_dir)), "circle", method="esd-x", iterations=60, ddim_steps=3, lr=1e-3).delta
    assert reference.keys() == b.keys()
    # the first Ctrl-C lets the current step finish and checkpoints at its boundary, so the resume is exact
    assert all(torch.equal(reference[k], b[k]) for k in b)


CHECKPOINTABLE = [name for name in DIFFUSION_METHODS  # a Janus method is not checkpointable yet (test_janus_methods says so)
                  if __import__("erasekit.methods", fromlist=["registry"]).registry()[name].checkpointable]


@pytest.mark.parametrize("method", CHECKPOINTABLE)
@pytest.mark.parametrize("faithful", [False, True])
def test_every_checkpointable_method_resumes_exactly_after_ctrl_c(method: str, faithful: bool, tmp_path: Path) -> None:
    import dataclasses

    from erasekit.methods import get_method

    fields = {f.name for f in dataclasses.fields(get_method(method).config_class)}
    if faithful and "faithful" not in fields:
        pytest.skip(f"{method} has no faithful mode")
    settings = {"budget": "tiny", "iterations": 6, **({"faithful": True} if faithful else {}),
                **({"rollout_reuse": 2} if "rollout_reuse" in fields and not faithful else {})}
    concept = "skull" if method == "geom-erasing" else "circle"  # geom-erasing removes an implicit concept
    if method == "co-erasing":  # stage 2 prompts with images through an adapter for the tiny model
        from conftest import tiny_adapter_dir

        settings["adapter"] = tiny_adapter_dir()
    reference = erasekit.erase(tiny_pipeline(), concept, method=method, **settings)
    spec = CheckpointSpec(tmp_path / "work", every=0)

    def interrupt(step: int, total: int, record: dict) -> None:
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(ErasekitError, match="checkpoint of step 4"):
        erasekit.erase(tiny_pipeline(), concept, method=method, progress=interrupt, checkpoint=spec, **settings)
    resumed = erasekit.erase(tiny_pipeline(), concept, method=method, checkpoint=spec, **settings)
    assert all(torch.equal(reference.delta[k], resumed.delta[k]) for k in reference.delta)
    assert [h["step"] for h in resumed.history if "step" in h] == list(range(1, 7))
