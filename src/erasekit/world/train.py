"""Rebuild the toy world from scratch: render data, train the VAE, the toy CLIP, the judge and the UNet.

As Stable Diffusion is built, the CLIP is trained first (contrastively, on renders and captions) and its
text tower is frozen while the UNet learns to denoise under it.

Every stage checkpoints atomically and resumes after a kill. Randomness is derived from
(seed, stage, step), so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError
from erasekit.world import toy
from erasekit.world.captions import caption
from erasekit.world.config import FORMAT, STAGE_OF, STAGES, WorldTrainConfig, load_saved_config
from erasekit.world.dataset import render_dataset, scenes_of
from erasekit.world.judge import Judge, to_judge_input
from erasekit.world.vocab import load_vocab

Progress = Callable[[str, int, int, dict], None]


def _atomic_torch_save(obj: object, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + step)


@torch.inference_mode()
def _encode(vae: Any, images: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Posterior means (unscaled) and uint8 reconstructions of uint8 NHWC images, in batches of 500 (on the VAE's device; CPU out)."""
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
    latents, recons = [], []
    device = next(vae.parameters()).device
    for start in range(0, len(images), 500):
        x = (x_all[start : start + 500].float() / 127.5 - 1.0).to(device)
        mean = vae.encode(x).latent_dist.mean
        latents.append(mean.cpu())
        recons.append(((vae.decode(mean).sample.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu())
    return torch.cat(latents), torch.cat(recons).numpy()


class WorldTrainer:
    """Runs the stages of the toy world's training into ``out`` (resumable)."""

    def __init__(self, out: Path, config: WorldTrainConfig, progress: Progress | None = None, device: str = "cpu") -> None:
        self.out = out
        self.work = out / "work"
        self.config = config
        # where the stages compute; draws stay on the CPU (the same draws on any device), floats follow the device
        self.device = torch.device(device)
        self.progress = progress or (lambda *a: None)
        cfg_path = self.work / "config.json"
        saved = load_saved_config(out)
        if saved is not None:
            self.run_id = saved[1]
            mine, theirs = asdict(config), asdict(saved[0])
            changed = [k for k in STAGE_OF if mine[k] != theirs[k]]
            if changed:
                # a setting may change while its stage has not begun, and the UNet may train longer ("resume to
                # train longer"); anything that would mix two settings in one stage's result is refused
                longer = mine["unet_steps"] > theirs["unet_steps"]
                frozen = [k for k in changed if self.begun(STAGE_OF[k]) and not (k == "unet_steps" and longer)]
                if frozen:
                    raise ErasekitError(
                        f"{out} holds a run with other settings ({', '.join(f'{k}={theirs[k]}' for k in frozen)}) "
                        f"for stages it has begun; resume with the same flags or pick a new --out"
                    )
                _atomic_write_text(cfg_path, json.dumps({"format": FORMAT, "run_id": self.run_id, **mine}, indent=1))
                if longer:
                    (self.work / "unet.done").unlink(missing_ok=True)
                    (self.work / "export.done").unlink(missing_ok=True)
        else:
            self.work.mkdir(parents=True, exist_ok=True)
            self.run_id = os.urandom(6).hex()
            _atomic_write_text(cfg_path, json.dumps({"format": FORMAT, "run_id": self.run_id, **asdict(config)}, indent=1))
        if config.threads:
            torch.set_num_threads(config.threads)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier (or this) run."""
        return (self.work / f"{stage}.done").exists()

    def begun(self, stage: str) -> bool:
        """Whether ``stage`` has begun: finished, or checkpointed part of the way."""
        return self.done(stage) or (self.work / f"{stage}.ckpt").exists()

    def _mark(self, stage: str, info: dict | None = None) -> None:
        _atomic_write_text(self.work / f"{stage}.done", json.dumps(info or {}))

    def run(self) -> dict:
        """Run every unfinished stage; return the judge's held-out accuracy and timings."""
        for stage in STAGES:
            if not self.done(stage):
                resumed = (self.work / f"{stage}.ckpt").exists()
                start = time.perf_counter()
                getattr(self, f"stage_{stage}")()
                info = json.loads((self.work / f"{stage}.done").read_text())
                info["seconds"] = round(time.perf_counter() - start, 1)
                info["resumed"] = resumed  # seconds then count only the last part of the stage
                info["device"] = str(self.device)
                self._mark(stage, info)
        return {**json.loads((self.work / "judge.done").read_text()), **json.loads((self.work / "clip.done").read_text())}

    # -- stages -----------------------------------------------------------------------------
    def stage_data(self) -> None:
        """Render the training and held-out sets."""
        self.progress("data", 0, 2, {})
        self._render("data")
        self.progress("data", 1, 2, {})
        self._render("heldout")
        self.progress("data", 2, 2, {})
        self._mark("data")

    def _render(self, name: str) -> None:
        c = self.config
        sizes = {"data": (c.n_images, 0), "heldout": (c.n_heldout, 10_000_000)}[name]
        rendered: dict[str, Any] = render_dataset(sizes[0], c.seed, offset=sizes[1])  # Any: numpy's savez stub types **kwds as its allow_pickle flag
        np.savez(self.work / f"{name}.tmp.npz", **rendered)
        os.replace(self.work / f"{name}.tmp.npz", self.work / f"{name}.npz")

    def _data(self, name: str = "data") -> dict[str, np.ndarray]:
        """A rendered set; re-rendered (deterministic by seed) where a slimmed work folder left it out."""
        if not (self.work / f"{name}.npz").exists() and self.done("data"):
            self._render(name)
        with np.load(self.work / f"{name}.npz") as f:
            return {k: f[k] for k in f.files}

    def _latents(self) -> torch.Tensor:
        """The scaled VAE latents of the training set; re-encoded with the trained VAE where a slimmed folder left them out."""
        path = self.work / "latents.pt"
        if not path.exists():
            from diffusers import AutoencoderKL

            vae: Any = AutoencoderKL.from_pretrained(self.work / "vae_model")
            latents, _ = _encode(vae.eval(), self._data()["images"])
            torch.save({"latents": latents * vae.config.scaling_factor}, path)
        return torch.load(path, weights_only=True)["latents"]

    def _resume(self, name: str, modules: dict, optimizer: torch.optim.Optimizer) -> int:
        path = self.work / f"{name}.ckpt"
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=True, map_location="cpu")  # module and optimizer loads move it to their device
        if state.get("run_id") != self.run_id:
            raise ErasekitError(
                f"{path} was written by another run ({state.get('run_id') or 'unknown'}, this is {self.run_id}); "
                "delete it to retrain that stage, or pick a new --out"
            )
        for key, module in modules.items():
            module.load_state_dict(state[key])
        optimizer.load_state_dict(state["optimizer"])
        return int(state["step"])

    def _after_step(self, name: str, step: int, total: int, loss: torch.Tensor, modules: dict, optimizer: torch.optim.Optimizer) -> None:
        """Report a finished step of a stage, and checkpoint it every ``checkpoint_every`` steps and at its end."""
        self.progress(name, step, total, {"loss": loss.item()})
        if step % self.config.checkpoint_every == 0 or step == total:
            self._checkpoint(name, step, modules, optimizer)

    def _checkpoint(self, name: str, step: int, modules: dict, optimizer: torch.optim.Optimizer) -> None:
        state = {key: m.state_dict() for key, m in modules.items()}
        state.update(optimizer=optimizer.state_dict(), step=step, run_id=self.run_id)
        _atomic_torch_save(state, self.work / f"{name}.ckpt")

    def stage_vae(self) -> None:
        """Train the AutoencoderKL on renders, then encode every image once."""
        c = self.config
        images = self._data()["images"]
        vae: Any = toy.build_vae(c.seed)  # a diffusers AutoencoderKL (Any: mypy cannot see its torch.nn.Module methods)
        vae.to(self.device)
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        step = self._resume("vae", {"vae": vae}, opt)
        x_all = torch.from_numpy(images).permute(0, 3, 1, 2)
        vae.train()
        while step < c.vae_steps:
            g = _step_generator(c.seed, 1, step)
            idx = torch.randint(0, len(images), (64,), generator=g)
            x = (x_all[idx].float() / 127.5 - 1.0).to(self.device)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(self.device)
            recon = vae.decode(z).sample
            loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
            lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / c.vae_steps)))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            self._after_step("vae", step, c.vae_steps, loss, {"vae": vae}, opt)
        vae.eval()
        latents_t, recon_np = _encode(vae, images)
        mse = float(np.mean((recon_np.astype(np.float32) - images.astype(np.float32)) ** 2))
        scaling = float(1.0 / latents_t.std())
        vae.register_to_config(scaling_factor=scaling)
        vae.cpu().save_pretrained(self.work / "vae_model", safe_serialization=True)
        torch.save({"latents": latents_t * scaling}, self.work / "latents.pt")
        np.save(self.work / "recons.npy", recon_np)
        self._mark("vae", {"recon_mse_uint8": mse, "scaling_factor": scaling})

    def stage_clip(self) -> None:
        """Train the toy CLIP contrastively on renders (and their VAE reconstructions) and fresh captions."""
        from erasekit.world import clip as toy_clip

        c = self.config
        vocab = load_vocab()
        data = self._data()
        recons = torch.from_numpy(np.load(self.work / "recons.npy"))
        clean = torch.from_numpy(data["images"])
        keys = torch.from_numpy(toy_clip.label_key(data["object"], data["colour"], data["style"], data["implicit"]))
        scenes = scenes_of(data)
        tokenizer = toy.build_tokenizer()
        model = toy_clip.build_clip(c.seed)
        torch.nn.Module.to(model, self.device)  # in place (transformers types its .to() for dtypes only)
        if c.clip_logit_scale:  # fixed temperature (see toy_clip.fix_temperature)
            toy_clip.fix_temperature(model, c.clip_logit_scale)
        opt = torch.optim.AdamW(model.parameters(), lr=c.clip_lr, weight_decay=0.05, foreach=True)
        step = self._resume("clip", {"clip": model}, opt)
        model.train()
        while step < c.clip_steps:
            g = _step_generator(c.seed, 4, step)
            rng = np.random.default_rng([c.seed, 4, step])
            idx = torch.randint(0, len(scenes), (c.clip_batch,), generator=g)
            use_recon = torch.rand(c.clip_batch, generator=g) < 0.5  # generations look like reconstructions
            x = toy_clip.pixels(torch.where(use_recon[:, None, None, None], recons[idx], clean[idx])).to(self.device)
            captions = [caption(scenes[i], int(data["kind"][i]), rng, vocab, c.pair_word_p, c.clip_swap_p) for i in idx.tolist()]
            ids = toy_clip.token_ids(tokenizer, captions).to(self.device)
            loss = toy_clip.contrastive_loss(model, x, ids, keys[idx].to(self.device))
            warm = min(1.0, (step + 1) / 200)
            for group in opt.param_groups:
                group["lr"] = c.clip_lr * warm * 0.5 * (1 + math.cos(math.pi * step / c.clip_steps))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            self._after_step("clip", step, c.clip_steps, loss, {"clip": model}, opt)
        model.cpu().eval()
        toy_clip.text_encoder_of(model).save_pretrained(self.work / "text_model", safe_serialization=True)
        toy_clip.save_clip(model, self.work / "clip_model", dtype=torch.float32)
        info = {
            "clip_zero_shot": toy_clip.zero_shot_accuracy(model, tokenizer, self._data("heldout")),
            "clip_object_similarity": toy_clip.object_similarity(model, tokenizer),
        }
        self._mark("clip", info)

    def stage_judge(self) -> None:
        """Train the judge on renders and on their VAE reconstructions (what generations look like)."""
        c = self.config
        vocab = load_vocab()
        data = self._data()
        recons = np.load(self.work / "recons.npy")
        judge = Judge(len(vocab.objects), len(vocab.colours), len(vocab.styles)).to(self.device)
        opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
        step = self._resume("judge", {"judge": judge}, opt)
        clean = to_judge_input(data["images"])
        recon = to_judge_input(recons)
        labels = {k: torch.from_numpy(data[k]) for k in ("object", "colour", "style", "implicit")}
        judge.train()
        while step < c.judge_steps:
            g = _step_generator(c.seed, 2, step)
            idx = torch.randint(0, len(clean), (128,), generator=g)
            use_recon = torch.rand(128, generator=g) < 0.5
            x = torch.where(use_recon[:, None, None, None], recon[idx], clean[idx])
            x = F.pad(x, (2, 2, 2, 2), mode="replicate")
            dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
            x = x[:, :, dy : dy + 32, dx : dx + 32]
            x = x + torch.rand(128, 1, 1, 1, generator=g) * 0.08 * torch.randn(x.shape, generator=g)
            out = judge(x.to(self.device))
            y = {k: v[idx].to(self.device) for k, v in labels.items()}
            loss = sum(F.cross_entropy(out[k], y[k]) for k in ("object", "colour", "style"))
            loss = loss + F.binary_cross_entropy_with_logits(out["implicit"][:, 0], y["implicit"].float())
            lr = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / c.judge_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            self._after_step("judge", step, c.judge_steps, loss, {"judge": judge}, opt)
        judge.cpu().eval()
        judge.save(self.work / "judge_model")
        held = self._data("heldout")
        from erasekit.world.judge import judge_images

        probs = judge_images(judge, held["images"])
        acc = {k: float(np.mean(probs[k].argmax(1) == held[k])) for k in ("object", "colour", "style")}
        acc["implicit"] = float(np.mean((probs["implicit"] > 0.5) == (held["implicit"] == 1)))
        self._mark("judge", {"judge_accuracy": acc})

    def stage_unet(self) -> None:
        """Train the UNet on latents and fresh paraphrased captions, under the frozen toy CLIP text tower."""
        from transformers import CLIPTextModel

        c = self.config
        vocab = load_vocab()
        data = self._data()
        latents = self._latents()
        tokenizer = toy.build_tokenizer()
        text = CLIPTextModel.from_pretrained(self.work / "text_model").eval().requires_grad_(False).to(self.device)
        # diffusers UNet2DConditionModels (Any: mypy cannot see their torch.nn.Module methods)
        unet: Any = toy.build_unet(c.seed)
        ema_unet: Any = toy.build_unet(c.seed)
        unet.to(self.device)
        ema_unet.to(self.device)
        ema_unet.load_state_dict(unet.state_dict())
        ema_unet.requires_grad_(False)
        params = list(unet.parameters())
        # foreach: the vectorised AdamW (torch's CPU default is a per-tensor loop, ~15% of a step here)
        opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0, foreach=True)
        modules = {"unet": unet, "ema_unet": ema_unet}
        step = self._resume("unet", modules, opt)
        scheduler: Any = toy.build_scheduler()  # a diffusers DDIMScheduler (alphas_cumprod is set at run time)
        alphas = scheduler.alphas_cumprod
        snr = alphas / (1 - alphas)
        scenes = scenes_of(data)
        token_cache: dict[str, list[int]] = {}
        unet.train()
        while step < c.unet_steps:
            g = _step_generator(c.seed, 3, step)
            rng = np.random.default_rng([c.seed, 3, step])
            idx = torch.randint(0, len(scenes), (c.batch_size,), generator=g)
            captions = [
                "" if rng.random() < c.cfg_dropout else caption(scenes[i], int(data["kind"][i]), rng, vocab, c.pair_word_p)
                for i in idx.tolist()
            ]
            for cap in captions:
                if cap not in token_cache:
                    token_cache[cap] = tokenizer(cap, padding="max_length", max_length=77, truncation=True).input_ids
            with torch.no_grad():
                cond = text(torch.tensor([token_cache[cap] for cap in captions]).to(self.device))[0]
            x0 = latents[idx]
            t = torch.randint(0, 1000, (c.batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = alphas[t].view(-1, 1, 1, 1)
            x0, noise, a, td = x0.to(self.device), noise.to(self.device), a.to(self.device), t.to(self.device)
            pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, td, cond).sample
            # min-SNR-5 weighting for epsilon prediction (Hang et al. 2023)
            weight = (torch.clamp(snr[t], max=5.0) / snr[t]).to(self.device)
            loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
            for group in opt.param_groups:
                group["lr"] = c.lr * min(1.0, (step + 1) / 200)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            decay = min(c.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(list(ema_unet.parameters()), list(unet.parameters()), 1 - decay)
            self._after_step("unet", step, c.unet_steps, loss, modules, opt)
        ema_unet.cpu().save_pretrained(self.work / "unet_model", safe_serialization=True)
        self._mark("unet")

    def stage_export(self) -> None:
        """Assemble the StableDiffusionPipeline folder (fp16 on disk), the toy CLIP's image tower and the judge into ``out``."""
        from erasekit.world.export import export_world

        export_world(self.work, self.out, asdict(self.config))
        self._mark("export")
