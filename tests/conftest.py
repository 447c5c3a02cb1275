"""Tiny random Stable Diffusion pipelines built in-process (diffusers' dummy-components style)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from erasekit.world.config import WorldTrainConfig
from erasekit.world.toy import build_tokenizer
from erasekit.world.train import WorldTrainer

torch.set_num_threads(1)  # every test (and every worker process it starts) on one CPU thread: CI machines are small


def _methods_of(families: tuple[str, ...]) -> list[str]:
    from erasekit.methods import registry

    return sorted(name for name, spec in registry().items() if set(spec.families) <= set(families))


def _family_tables() -> tuple[list[str], list[str]]:
    from erasekit.methods.specs import AUTOREGRESSIVE_FAMILIES, DIFFUSION_FAMILIES

    return _methods_of(DIFFUSION_FAMILIES), _methods_of(AUTOREGRESSIVE_FAMILIES)


# the method tables, one per engine: a registered method is in exactly one (test_janus_methods checks it), so a test
# that runs "every method" on an SD pipeline takes DIFFUSION_METHODS, and the Janus tests take JANUS_METHODS
DIFFUSION_METHODS, JANUS_METHODS = _family_tables()


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A random SD pipeline small enough to build and train in well under a second per step."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8), latent_channels=4,
        norm_num_groups=4, sample_size=16,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=build_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def tiny() -> StableDiffusionPipeline:
    """A fresh tiny pipeline."""
    return tiny_pipeline()


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    """A tiny pipeline saved as a diffusers folder."""
    folder = tmp_path / "tiny-sd"
    tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def janus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Janus (transformers' JanusForConditionalGeneration) saved to a folder, built once per session."""
    from erasekit.autoregressive.tiny import build_tiny_janus

    return build_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")


@pytest.fixture(scope="session")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained judge with the toy world's head sizes (it reads any image size), saved once per session."""
    from erasekit.world.judge import Judge
    from erasekit.world.vocab import load_vocab

    torch.manual_seed(0)
    vocab = load_vocab()
    folder = tmp_path_factory.mktemp("judge") / "judge"
    Judge(n_objects=len(vocab.objects), n_colours=len(vocab.colours), n_styles=len(vocab.styles)).eval().save(folder)
    return folder


@pytest.fixture(scope="session")
def ear_run(janus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EAR run folder on the tiny Janus, as `erasekit erase` writes it (tests may add evaluations and attacks to it)."""
    from typer.testing import CliRunner

    from erasekit.cli import app

    out = tmp_path_factory.mktemp("ear") / "run"
    res = CliRunner().invoke(app, ["erase", "--model", str(janus_dir), "-c", "circle", "--method", "ear", "--budget", "tiny", "--lr", "1e-1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def words_file(tmp_path: Path) -> Path:
    """A small concept-space word list."""
    path = tmp_path / "words.txt"
    path.write_text("\n".join(["circle", "ring", "moon", "square", "diamond", "triangle", "arrow", "star", "cross", "hexagon",
                               "apple", "banana", "dog", "cat", "car", "tree", "house", "river", "bird", "fish"]) + "\n")
    return path


# -- a tiny toy-world training, shared by every test file that needs one ---------------------


@dataclass(frozen=True)
class SmokeRun:
    """A tiny training stopped after the VAE stage, then resumed to the end by a new trainer."""

    out: Path
    resumed_stages: list[str]
    unet_losses: list[float]
    vae_done_before: bytes


def tiny_config() -> WorldTrainConfig:
    """A config that trains every stage for a few steps on one thread (the VAE step, batch 64, is the costly one)."""
    return WorldTrainConfig(
        n_images=300, n_heldout=60, vae_steps=6, clip_steps=12, clip_batch=32, judge_steps=15, unet_steps=30,
        batch_size=16, checkpoint_every=10, threads=1,
    )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    out = tmp_path_factory.mktemp("world") / "run"
    threads = torch.get_num_threads()
    first = WorldTrainer(out, tiny_config())
    first.stage_data()
    first.stage_vae()  # then "killed": the judge, UNet and export stages never ran
    vae_done = (out / "work" / "vae.done").read_bytes()
    stages: list[str] = []
    losses: list[float] = []

    def record(stage: str, step: int, total: int, info: dict) -> None:
        stages.append(stage)
        if stage == "unet":
            losses.append(float(info["loss"]))

    WorldTrainer(out, tiny_config(), record).run()
    torch.set_num_threads(threads)  # the tiny config trains on one thread; later tests get the default back
    return SmokeRun(out, list(dict.fromkeys(stages)), losses, vae_done)


class Loaded(Exception):
    """Raised in place of loading a model: every check before the load passed."""


@pytest.fixture
def no_model_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any model load raise Loaded, so a test sees whether a command got as far as loading."""
    import erasekit.models

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Loaded

    monkeypatch.setattr(erasekit.models, "load_pipeline", refuse)


def kill_at_first_checkpoint(command: list[str], out: Path, env: dict[str, str]) -> None:
    """Start an ``erase`` command writing ``out``, SIGKILL it once its first checkpoint exists, and check it died mid-run."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out.parent / f"{out.name}.partial" / "checkpoint.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not out.exists(), "the run must have been killed mid-way"


def tiny_adapter(unet: Any, folder: Path, seed: int = 0) -> Path:
    """A random IP-Adapter for ``unet`` (any cross-attention width) with a tiny image encoder, in the public layout, saved to ``folder``."""
    import copy

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from erasekit.image_prompt import projection
    from erasekit.world.adapter import adapter_state, fresh_state, preprocessor, save_adapter

    unet = copy.deepcopy(unet)
    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=12))
    unet._load_ip_adapter_weights([fresh_state(unet, 12, seed)])
    with torch.no_grad():  # a projection with weight in every token, so an image visibly changes the output
        projection(unet).image_embeds.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    save_adapter(folder, adapter_state(unet), encoder, preprocessor())
    return folder


_ADAPTERS: dict[str, Path] = {}


def tiny_adapter_dir() -> str:
    """One random IP-Adapter for :func:`tiny_pipeline`'s UNet, built once per test process."""
    if "tiny" not in _ADAPTERS:
        import tempfile

        _ADAPTERS["tiny"] = tiny_adapter(tiny_pipeline().unet, Path(tempfile.mkdtemp(prefix="erasekit-adapter-")) / "ip")
    return str(_ADAPTERS["tiny"])
