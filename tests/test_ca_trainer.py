"""CA in the shared run life cycle: exact resume after a kill or a Ctrl-C, its trainable set only, the NaN guard, released encoders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import erasekit
from conftest import kill_at_first_checkpoint, tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.families import family_of
from erasekit.methods import get_method
from erasekit.methods.ca import ca_parameters
from erasekit.methods.checkpoint import CheckpointSpec
from erasekit.result import load_result

SMALL = {"method": "ca", "iterations": 8, "ddim_steps": 3, "anchor_images": 4, "batch_size": 2, "lr": 1e-3}
# the other branch of every draw: noise-based target and a second (prior-preservation) batch per step
PRIOR = {**SMALL, "loss": "noise-based", "prior_preservation": True, "kv_only": False}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stop_at(n: int):  # type: ignore[no-untyped-def]
    def progress(step: int, total: int, record: dict) -> None:
        if step == n:
            raise KeyboardInterrupt

    return progress


def test_ca_is_checkpointable() -> None:
    assert get_method("ca").checkpointable


@pytest.mark.parametrize("settings", [SMALL, PRIOR], ids=["model-based", "prior-preservation"])
@pytest.mark.parametrize("every, stop", [(0, 5), (2, 5)], ids=["ctrl-c-only", "periodic"])
def test_ca_stopped_mid_run_resumes_to_the_uninterrupted_weights(settings: dict, every: int, stop: int, tmp_path: Path) -> None:
    reference = erasekit.erase(tiny_pipeline(), "circle", **settings)
    spec = CheckpointSpec(tmp_path / "work", every=every)
    with pytest.raises(ErasekitError, match=f"checkpoint of step {stop}"):
        erasekit.erase(tiny_pipeline(), "circle", progress=_stop_at(stop), checkpoint=spec, **settings)
    resumed = erasekit.erase(tiny_pipeline(), "circle", checkpoint=spec, **settings)
    assert _same(reference.delta, resumed.delta)
    assert resumed.history == reference.history  # the anchor header, then one record per step, losses included
    assert [h["step"] for h in resumed.history if "step" in h] == list(range(1, settings["iterations"] + 1))


def test_ca_resume_refuses_a_checkpoint_of_other_settings(tmp_path: Path) -> None:
    spec = CheckpointSpec(tmp_path / "work", every=2)
    with pytest.raises(ErasekitError, match="checkpoint of step 3"):
        erasekit.erase(tiny_pipeline(), "circle", progress=_stop_at(3), checkpoint=spec, **SMALL)
    with pytest.raises(ErasekitError, match="other settings"):
        erasekit.erase(tiny_pipeline(), "circle", checkpoint=spec, **{**SMALL, "anchor": "ring"})


def test_ca_sigkilled_through_the_cli_resumes_to_the_same_delta(tiny_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cli = [sys.executable, "-c", "from erasekit.cli import main; main()", "erase"]
    common = [*cli, "--model", str(tiny_dir), "-c", "circle", "--method", "ca", "--iterations", "60", "--anchor-images", "4",
              "--ddim-steps", "3", "--batch-size", "2", "--lr", "1e-3", "--checkpoint-every", "4"]
    killed_out = tmp_path / "killed"
    kill_at_first_checkpoint([*common, "--out", str(killed_out)], killed_out, env)

    resumed = subprocess.run([*cli, "--resume", str(killed_out)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not (tmp_path / "killed.partial").exists()
    # the uninterrupted run (the CLI and this call give the same delta bitwise on one thread)
    from erasekit.models import load_pipeline

    reference = erasekit.erase(load_pipeline(str(tiny_dir)), "circle", method="ca", iterations=60, anchor_images=4, ddim_steps=3, batch_size=2, lr=1e-3)
    assert _same(reference.delta, load_result(killed_out / "delta.safetensors").delta)


@pytest.mark.parametrize("train_method, kv_only", [("xattn", True), ("full", True), ("xattn", False), ("selfattn", False)])
def test_ca_through_the_trainer_changes_only_its_train_method(train_method: str, kv_only: bool) -> None:
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    result = erasekit.erase(pipe, "circle", **{**SMALL, "iterations": 2, "train_method": train_method, "kv_only": kv_only})
    expected = set(ca_parameters(family_of(pipe), pipe.unet, train_method, kv_only))
    assert {k.removeprefix("unet.") for k in result.delta} == expected
    assert all(not torch.equal(result.delta[f"unet.{k}"], before[k]) for k in expected), "every trained tensor moved"
    assert _same(before, pipe.unet.state_dict()), "the pipeline was left changed"
    assert not any(p.requires_grad for p in pipe.unet.parameters())


def test_ca_nan_loss_stops_with_one_line_and_restores_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("erasekit.checks.MAX_LR", 1e31)  # validation refuses lr 1e30; the trainer's own guard is what is tested here
    pipe = tiny_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ErasekitError, match="the loss became") as info:
        erasekit.erase(pipe, "circle", checkpoint=CheckpointSpec(tmp_path / "work", every=1), **{**SMALL, "lr": 1e30})
    assert "\n" not in str(info.value)
    assert _same(before, pipe.unet.state_dict()), "the pipeline was left changed"


def test_ca_frees_the_text_encoder_once_its_embeddings_exist() -> None:
    kept = erasekit.erase(tiny_pipeline(), "circle", **SMALL)
    pipe = tiny_pipeline()
    released = erasekit.erase(pipe, "circle", release_unused=True, **SMALL)
    assert _same(kept.delta, released.delta)
    assert all(p.device.type == "meta" for p in pipe.text_encoder.parameters())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_ca_mixed_precision_keeps_fp32_weights(precision: str) -> None:
    full = erasekit.erase(tiny_pipeline(), "circle", **SMALL)
    mixed = erasekit.erase(tiny_pipeline(), "circle", precision=precision, **SMALL)
    assert mixed.config["precision"] == precision and all(v.dtype == torch.float32 for v in mixed.delta.values())
    assert full.delta.keys() == mixed.delta.keys() and not _same(full.delta, mixed.delta)


def test_ca_failing_before_training_leaves_the_pipeline_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    import erasekit.methods.ca as ca

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise ErasekitError("out of memory while generating")

    monkeypatch.setattr(ca, "anchor_latents", broken)
    pipe = tiny_pipeline()
    pipe.unet.requires_grad_(False)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ErasekitError, match="generating"):
        erasekit.erase(pipe, "circle", **SMALL)
    assert _same(before, pipe.unet.state_dict()) and not any(p.requires_grad for p in pipe.unet.parameters())
