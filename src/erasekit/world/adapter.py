"""The toy world's image-prompt adapter: an IP-Adapter trained on renders with the toy UNet frozen.

As Ye et al. (2023) train theirs: the toy CLIP's image tower (the one the world ships, frozen) embeds a render,
an ``ImageProjection`` turns the embedding into 4 tokens, and new key/value projections in every
cross-attention (initialised from the text's) read them; only those are trained, on the denoising loss
of the same render under its caption. The caption is dropped a quarter of the time (so the image alone
can prompt) and the image 5 % of the time (so classifier-free guidance has an image-free branch).

Written in the public IP-Adapter layout (``image_proj.*``/``ip_adapter.*`` keys, ``image_encoder/``), so
:func:`erasekit.image_prompt.attach_adapter` loads it through diffusers as it loads a real one.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from erasekit.atomic import atomic_folder
from erasekit.errors import ErasekitError
from erasekit.image_prompt import ENCODER, WEIGHTS, projection
from erasekit.world.captions import caption
from erasekit.world.vocab import load_vocab

Progress = Callable[[int, int, dict], None]
TOKENS = 4
OFFSET = 30_000_000  # render indices of the adapter's data: disjoint from the world's training and held-out sets


@dataclass(frozen=True)
class AdapterConfig:
    """Settings of the toy adapter's training (a resumed run must use the same)."""

    seed: int = 0
    n_images: int = 8000
    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    text_drop: float = 0.25
    image_drop: float = 0.05
    checkpoint_every: int = 100


def image_encoder_from_clip(clip_folder: Path, text_encoder: Any) -> Any:
    """The toy CLIP's image tower and projection as a ``CLIPVisionModelWithProjection`` (what IP-Adapters load)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from erasekit.world.clip import load_clip

    clip: Any = load_clip(clip_folder, text_encoder)
    config = CLIPVisionConfig(**{**clip.config.vision_config.to_dict(), "projection_dim": clip.config.projection_dim})
    enc = CLIPVisionModelWithProjection(config)
    enc.vision_model.load_state_dict(clip.vision_model.state_dict())
    enc.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return enc.eval()


def preprocessor() -> Any:
    """32 x 32 pixels scaled to [-1, 1], the toy CLIP's convention (mean 0.5, std 0.5)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def fresh_state(unet: Any, embed_dim: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """A new adapter in the public layout: a random projection, and each cross-attention's to_k/to_v copied as to_k_ip/to_v_ip."""
    g = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)
    proj = {
        "proj.weight": torch.randn(TOKENS * width, embed_dim, generator=g) / embed_dim**0.5,
        "proj.bias": torch.zeros(TOKENS * width), "norm.weight": torch.ones(width), "norm.bias": torch.zeros(width),
    }
    ip: dict[str, torch.Tensor] = {}
    for i, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name[: -len(".processor")])
            ip[f"{i}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
            ip[f"{i}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    return {"image_proj": proj, "ip_adapter": ip}


def adapter_state(unet: Any) -> dict[str, torch.Tensor]:
    """The loaded adapter of ``unet`` as one flat state dict in the public layout (``image_proj.*``, ``ip_adapter.*``)."""
    layer = projection(unet)
    out = {"image_proj.proj.weight": layer.image_embeds.weight, "image_proj.proj.bias": layer.image_embeds.bias,
           "image_proj.norm.weight": layer.norm.weight, "image_proj.norm.bias": layer.norm.bias}
    procs: dict[str, Any] = dict(unet.attn_processors)
    for i, (name, proc) in enumerate(procs.items()):
        if name.endswith("attn2.processor"):
            out[f"ip_adapter.{i}.to_k_ip.weight"] = proc.to_k_ip[0].weight
            out[f"ip_adapter.{i}.to_v_ip.weight"] = proc.to_v_ip[0].weight
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def adapter_parameters(unet: Any) -> list[torch.nn.Parameter]:
    """What training the adapter changes: the projection and every to_k_ip/to_v_ip."""
    params = list(unet.encoder_hid_proj.parameters())
    procs: dict[str, Any] = dict(unet.attn_processors)
    for name, proc in procs.items():
        if name.endswith("attn2.processor"):
            params += list(proc.parameters())
    return params


class AdapterTrainer:
    """Trains the toy adapter into ``out`` (checkpointed every ``checkpoint_every`` steps; resumes after a kill)."""

    def __init__(self, out: Path, config: AdapterConfig, progress: Progress | None = None) -> None:
        self.out, self.config, self.progress = Path(out), config, progress or (lambda *a: None)
        self.ckpt = self.out / "adapter.ckpt"
        settings = self.out / "adapter_settings.json"
        mine = {k: v for k, v in asdict(config).items() if k != "steps"}  # more steps resumes a run to train longer
        try:
            if settings.is_file() and json.loads(settings.read_text()) != mine:
                raise ErasekitError(f"{self.out} holds an adapter run with other settings ({settings}); resume it with the same ones, or pick a new --out")
            self.out.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps(mine))
        except (OSError, ValueError) as exc:
            raise ErasekitError(f"cannot use {self.out} for the adapter run ({exc.__class__.__name__}: {str(exc)[:120]}); pass a writable, empty or earlier --out") from None

    def _data(self, pipe: Any, encoder: Any) -> dict[str, Any]:
        from erasekit.world.train import _encode, render_dataset, scenes_of

        c = self.config
        data = render_dataset(c.n_images, c.seed, offset=OFFSET)
        latents, _ = _encode(pipe.vae, data["images"])
        proc = preprocessor()
        with torch.inference_mode():
            embeds = torch.cat([encoder(proc(list(data["images"][s : s + 500]), return_tensors="pt").pixel_values).image_embeds
                                for s in range(0, c.n_images, 500)])
        return {"latents": latents * pipe.vae.config.scaling_factor, "embeds": embeds, "scenes": scenes_of(data), "kind": data["kind"]}

    def run(self) -> dict[str, Any]:
        """Train (or resume) and write ``ip_adapter.safetensors`` and ``image_encoder/``; returns the run's record."""
        from erasekit.models import load_pipeline, toy_dir

        c = self.config
        started = time.perf_counter()
        pipe = load_pipeline("toy")
        unet = pipe.unet.requires_grad_(False)
        encoder = image_encoder_from_clip(toy_dir() / "clip", pipe.text_encoder).requires_grad_(False)
        unet._load_ip_adapter_weights([fresh_state(unet, encoder.config.projection_dim, c.seed)])
        params = adapter_parameters(unet)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
        step = 0
        if self.ckpt.exists():
            state = torch.load(self.ckpt, weights_only=True)
            for p, saved in zip(params, state["params"]):
                p.data.copy_(saved)
            opt.load_state_dict(state["optimizer"])
            step = int(state["step"])
        data = self._data(pipe, encoder)
        alphas = pipe.scheduler.alphas_cumprod
        snr = alphas / (1 - alphas)
        vocab, tokenizer = load_vocab(), pipe.tokenizer
        cache: dict[str, torch.Tensor] = {}
        unet.train()
        while step < c.steps:
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + 7 * 10_007 + step)
            rng = np.random.default_rng([c.seed, 7, step])
            idx = torch.randint(0, c.n_images, (c.batch_size,), generator=g)
            caps = ["" if rng.random() < c.text_drop else caption(data["scenes"][i], int(data["kind"][i]), rng, vocab, 0.0) for i in idx.tolist()]
            for cap in set(caps) - set(cache):
                ids = tokenizer(cap, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
                with torch.no_grad():
                    cache[cap] = pipe.text_encoder(ids)[0][0]
            embeds = data["embeds"][idx] * torch.as_tensor(rng.random(c.batch_size) >= c.image_drop, dtype=torch.float32)[:, None]
            x0, t = data["latents"][idx], torch.randint(0, 1000, (c.batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, torch.stack([cache[k] for k in caps]),
                        added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
            loss = (torch.clamp(snr[t], max=5.0) / snr[t] * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            self.progress(step, c.steps, {"loss": loss.item()})
            if step % c.checkpoint_every == 0 or step == c.steps:
                tmp = self.ckpt.with_suffix(".tmp")
                torch.save({"params": [p.detach() for p in params], "optimizer": opt.state_dict(), "step": step}, tmp)
                os.replace(tmp, self.ckpt)
        return self._export(unet, encoder, time.perf_counter() - started)

    def _export(self, unet: Any, encoder: Any, seconds: float) -> dict[str, Any]:
        record = {"config": asdict(self.config), "seconds": round(seconds, 1)}
        save_adapter(self.out / "ip_adapter", adapter_state(unet), encoder, preprocessor(), record)
        return record


def save_adapter(folder: Path, state: dict[str, torch.Tensor], encoder: Any, processor: Any, record: dict[str, Any] | None = None) -> None:
    """Write an IP-Adapter folder (fp16 weights in the public layout, ``image_encoder/``, the preprocessor) through a temp folder."""
    with atomic_folder(folder) as tmp:
        save_file({k: v.half() for k, v in state.items()}, str(tmp / WEIGHTS))
        encoder.to(torch.float16).save_pretrained(tmp / ENCODER, safe_serialization=True)
        processor.save_pretrained(str(tmp))
        if record is not None:
            (tmp / "adapter_train.json").write_text(json.dumps(record, indent=1))
