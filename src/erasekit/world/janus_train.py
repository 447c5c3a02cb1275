"""Build the toy Janus from the toy world's renders and captions: data, VQ image tokenizer, image tokens, language model.

Stages (each checkpointed atomically; a killed run resumes where it stopped and ends bit for bit where an
uninterrupted one would, since every random draw comes from (seed, stage, step)):

* ``data``: render the training set (the toy world's scenes, captions drawn fresh at every step);
* ``vq``: the Janus VQ model (``model.vqmodel``) as a VQ autoencoder on the renders: reconstruction (MSE + L1/2)
  plus codebook + commitment loss, dead codes restarted on encoder outputs (see :mod:`.janus_model`);
* ``tokens``: every render tokenised once by the trained VQ model;
* ``lm``: the language model, generation embeddings, aligner and head trained by next-image-token
  cross-entropy on (caption, image tokens), the caption replaced by Janus's unconditional pad prompt
  (:func:`erasekit.autoregressive.janus.unconditional`) with probability ``cfg_dropout`` so CFG works;
* ``export``: ``save_pretrained`` of the whole ``JanusForConditionalGeneration`` with its tokenizer and
  generation config into ``OUT/janus`` (through ``OUT/janus.tmp`` and a rename), loadable with
  :func:`erasekit.autoregressive.load_janus`.
"""

from __future__ import annotations

import io
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

from erasekit.atomic import atomic_folder, atomic_write_bytes, atomic_write_text
from erasekit.errors import ErasekitError
from erasekit.world.janus_model import (
    FORMAT,
    STAGE_OF,
    STAGES,
    JanusTrainConfig,
    build_toy_janus,
    check_sizes,
    pixels,
    restart_dead_codes,
    tokenize_images,
    vq_losses,
)

Progress = Callable[[str, int, int, dict], None]
OFFSET = 40_000_000  # render indices of the toy Janus's data: disjoint from the world's, the adapter's and the checks'
RESTART_EVERY = 100  # VQ steps between dead-code restarts (none in the last quarter, so the codebook settles)
LM_TRAINED = ("model.language_model.", "model.generation_")  # what the lm stage trains (the text head is tied)


def image_size() -> int:
    """Pixels per side of the toy world's renders."""
    from erasekit.world.vocab import load_vocab

    return int(load_vocab().raw["image_size"])


def _atomic_torch_save(obj: object, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + stage * 10_007 + step)


def _saved(out: Path) -> tuple[dict[str, Any], str] | None:
    """The settings and run id of the toy-Janus run ``out`` holds, None if none; a one-line error if it cannot resume."""
    path = out / "work" / "config.json"
    if not path.is_file():
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ErasekitError(f"{out} exists and holds no toy-Janus run to resume; pick a new --out")
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.pop("format", None) != FORMAT or raw.pop("family", None) != "janus":
            raise ValueError("not a toy-Janus run of this format")
        run_id = str(raw.pop("run_id"))
        JanusTrainConfig(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise ErasekitError(f"{path} is not a toy-Janus run this erasekit can resume ({str(exc)[:80]}); pick a new --out") from None
    return raw, run_id


class JanusTrainer:
    """Runs the toy Janus's stages into ``out`` (resumable); ``progress(stage, step, total, info)`` follows each step."""

    def __init__(self, out: Path, config: JanusTrainConfig, progress: Progress | None = None) -> None:
        self.out, self.work, self.config = Path(out), Path(out) / "work", config
        self.progress = progress or (lambda *a: None)
        check_sizes(config, image_size())
        saved = _saved(self.out)
        mine = asdict(config)
        if saved is not None:
            theirs, self.run_id = saved
            frozen = [k for k in STAGE_OF if mine[k] != theirs[k] and self.begun(STAGE_OF[k])]
            if frozen:
                flags = ", ".join(f"--{k.replace('_', '-')} {theirs[k]}" for k in frozen)
                raise ErasekitError(f"{self.out} holds a toy-Janus run begun with other settings; resume it with {flags}, or pick a new --out")
        else:
            self.run_id = os.urandom(6).hex()
        try:
            self.work.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.work / "config.json", json.dumps({"format": FORMAT, "family": "janus", "run_id": self.run_id, **mine}, indent=1))
        except OSError as exc:
            raise ErasekitError(f"cannot write the toy-Janus run in {self.out} ({exc.strerror or exc}); pick a writable --out") from None
        if config.threads:
            torch.set_num_threads(config.threads)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished in an earlier (or this) run."""
        return (self.work / f"{stage}.done").exists()

    def begun(self, stage: str) -> bool:
        """Whether ``stage`` has begun: finished, or checkpointed part of the way (later stages build on it)."""
        later = STAGES[STAGES.index(stage) :]
        return any(self.done(s) or (self.work / f"{s}.ckpt").exists() for s in later)

    def _mark(self, stage: str, info: dict | None = None) -> None:
        atomic_write_text(self.work / f"{stage}.done", json.dumps(info or {}))

    def run(self) -> dict[str, Any]:
        """Run every unfinished stage; returns the run's record (also written to ``OUT/janus/janus_train.json``)."""
        for stage in STAGES:
            if not self.done(stage):
                resumed = (self.work / f"{stage}.ckpt").exists()
                start = time.perf_counter()
                info = getattr(self, f"stage_{stage}")() or {}
                self._mark(stage, {**info, "seconds": round(time.perf_counter() - start, 1), "resumed": resumed})
        return json.loads((self.out / "janus" / "janus_train.json").read_text())

    # -- helpers ----------------------------------------------------------------------------
    def _model(self) -> tuple[Any, Any]:
        return build_toy_janus(self.config, image_size())

    def _data(self) -> dict[str, np.ndarray]:
        with np.load(self.work / "data.npz") as f:
            return {k: f[k] for k in f.files}

    def _resume(self, stage: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> int:
        """Load a stage's checkpoint (weights, optimizer, extra tensors) if there is one; the step it reached."""
        path = self.work / f"{stage}.ckpt"
        if not path.exists():
            return 0
        state = torch.load(path, weights_only=True)
        if state.get("run_id") != self.run_id:
            raise ErasekitError(f"{path} was written by another run; delete it to retrain that stage, or pick a new --out")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        for key, tensor in extra.items():
            tensor.copy_(state[key])
        return int(state["step"])

    def _after_step(self, stage: str, step: int, total: int, loss: float, module: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, extra: dict[str, torch.Tensor]) -> None:
        """Checkpoint every ``checkpoint_every`` steps and at the end, then report (a kill in the report loses nothing)."""
        if step % self.config.checkpoint_every == 0 or step == total:
            state = {"module": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "run_id": self.run_id, **extra}
            _atomic_torch_save(state, self.work / f"{stage}.ckpt")
        self.progress(stage, step, total, {"loss": loss})

    @staticmethod
    def _lr(peak: float, step: int, total: int, warmup: int) -> float:
        """Linear warm-up, then cosine decay to a tenth of the peak."""
        return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))

    # -- stages -----------------------------------------------------------------------------
    def stage_data(self) -> dict[str, Any]:
        """Render the training set (images, labels, caption kinds)."""
        from erasekit.world.dataset import render_dataset

        self.progress("data", 0, 1, {})
        rendered: dict[str, Any] = render_dataset(self.config.n_images, self.config.seed, offset=OFFSET)
        np.savez(self.work / "data.tmp.npz", **rendered)
        os.replace(self.work / "data.tmp.npz", self.work / "data.npz")
        self.progress("data", 1, 1, {})
        return {}

    def stage_vq(self) -> dict[str, Any]:
        """Train the VQ image tokenizer as an autoencoder on renders; saves its weights to ``work/vq.safetensors``."""
        from safetensors.torch import save_file

        c = self.config
        images = torch.from_numpy(self._data()["images"])
        model, _ = self._model()
        vq = model.model.vqmodel
        opt = torch.optim.AdamW(vq.parameters(), lr=c.vq_lr, weight_decay=0.0, foreach=True)
        usage = torch.zeros(c.codebook, dtype=torch.long)
        step = self._resume("vq", vq, opt, {"usage": usage})
        vq.train()
        while step < c.vq_steps:
            g = _step_generator(c.seed, 11, step)
            x = pixels(images[torch.randint(0, len(images), (c.vq_batch,), generator=g)])
            recon_loss, codebook_loss, index = vq_losses(vq, x, c.commitment)
            loss = recon_loss + codebook_loss
            for group in opt.param_groups:
                group["lr"] = self._lr(c.vq_lr, step, c.vq_steps, 100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
            opt.step()
            usage += torch.bincount(index.flatten(), minlength=c.codebook)
            step += 1
            if step % RESTART_EVERY == 0 and step <= 0.75 * c.vq_steps:
                with torch.no_grad():
                    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
                restart_dead_codes(vq, usage, z, g)
            self._after_step("vq", step, c.vq_steps, loss.item(), vq, opt, {"usage": usage})
        vq.eval()
        save_file({k: v.detach().contiguous() for k, v in vq.state_dict().items()}, str(self.work / "vq.safetensors"))
        tokens = tokenize_images(vq, images[:2000])
        with torch.no_grad():
            recon = vq.decoder(vq.post_quant_conv(vq.quantize.get_codebook_entry(tokens)))  # what JanusVQVAE.decode draws
        mse = float(((recon.clamp(-1, 1) - pixels(images[:2000])) * 127.5).pow(2).mean())
        return {"recon_mse_uint8": round(mse, 2), "codes_used": int(tokens.unique().numel())}

    def _load_vq(self, model: Any) -> None:
        from safetensors.torch import load_file

        model.model.vqmodel.load_state_dict(load_file(str(self.work / "vq.safetensors")))

    def stage_tokens(self) -> dict[str, Any]:
        """Tokenise every render with the trained VQ model (``work/tokens.pt``)."""
        model, _ = self._model()
        self._load_vq(model)
        self.progress("tokens", 0, 1, {})
        tokens = tokenize_images(model.model.vqmodel.eval(), torch.from_numpy(self._data()["images"]))
        _atomic_torch_save({"tokens": tokens}, self.work / "tokens.pt")
        self.progress("tokens", 1, 1, {})
        return {}

    def stage_lm(self) -> dict[str, Any]:
        """Train the image-generation path by next-image-token cross-entropy under (sometimes dropped) captions."""
        from erasekit.autoregressive.janus import Janus, Prompts, encode_prompts, image_logits, unconditional
        from erasekit.world.captions import caption
        from erasekit.world.dataset import scenes_of
        from erasekit.world.vocab import load_vocab

        c = self.config
        vocab = load_vocab()
        data = self._data()
        tokens = torch.load(self.work / "tokens.pt", weights_only=True)["tokens"]
        scenes = scenes_of(data)
        model, tokenizer = self._model()
        self._load_vq(model)
        janus = Janus(model, tokenizer)
        model.requires_grad_(False)
        trained = {n: p for n, p in model.named_parameters() if n.startswith(LM_TRAINED)}
        for p in trained.values():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(list(trained.values()), lr=c.lm_lr, weight_decay=0.01, foreach=True)
        step = self._resume("lm", model, opt, {})
        last_loss: float | None = None
        model.train()
        model.model.vqmodel.eval()
        while step < c.lm_steps:
            g = _step_generator(c.seed, 12, step)
            rng = np.random.default_rng([c.seed, 12, step])
            idx = torch.randint(0, len(scenes), (c.lm_batch,), generator=g)
            prompts = encode_prompts(janus, [caption(scenes[i], int(data["kind"][i]), rng, vocab) for i in idx.tolist()])
            drop = torch.rand(c.lm_batch, generator=g) < c.cfg_dropout  # exactly the unconditional branch CFG reads
            ids = torch.where(drop[:, None], unconditional(janus, prompts).input_ids, prompts.input_ids)
            target = tokens[idx]
            logits = image_logits(model, Prompts(ids, prompts.attention_mask), target)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
            for group in opt.param_groups:
                group["lr"] = self._lr(c.lm_lr, step, c.lm_steps, 200)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(trained.values()), 1.0)
            opt.step()
            step += 1
            last_loss = loss.item()
            self._after_step("lm", step, c.lm_steps, last_loss, model, opt, {})
        return {"final_loss": None if last_loss is None else round(last_loss, 4)}

    def stage_export(self) -> dict[str, Any]:
        """Write ``OUT/janus`` (model, tokenizer, generation config, ``janus_train.json``) through a temp folder and a rename."""
        model, tokenizer = self._model()
        state = torch.load(self.work / "lm.ckpt", weights_only=True)["module"]
        model.load_state_dict(state)
        with atomic_folder(self.out / "janus") as tmp:
            self._export_into(tmp, model, tokenizer)
        return {}

    def _export_into(self, tmp: Path, model: Any, tokenizer: Any) -> None:
        """Fill the export's temp folder: model, tokenizer and ``janus_train.json``."""
        from erasekit.models import quiet_loading

        with quiet_loading():
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        record: dict[str, Any] = {"format": FORMAT, "config": asdict(self.config), "seconds": {}}
        for stage in STAGES[:-1]:
            info = json.loads((self.work / f"{stage}.done").read_text())
            record["seconds"][stage] = info.pop("seconds", None)
            info.pop("resumed", None)
            record.update(info)
        record["size_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        (tmp / "janus_train.json").write_text(json.dumps(record, indent=1))
