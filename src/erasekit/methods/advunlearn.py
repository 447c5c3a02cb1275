"""AdvUnlearn (Zhang et al., NeurIPS 2024): adversarial training of the text encoder, the denoiser untouched.

Every iteration is a bilevel step. Inner (the attack): free embeddings at N prefix-token positions before the
target prompt are moved by signed-gradient steps (PGD) so that the *current* model's prediction on the attacked
prompt matches the *base* model's on the concept, i.e. so that it regenerates the concept. Outer: ESD's erasure
loss through the text encoder on the attacked prompt,

    || eps(x_t, E_theta([delta; c])) - (eps0(x_t, '') - eta (eps0(x_t, c) - eps0(x_t, ''))) ||^2,

plus ``retain_weight`` x the utility loss || eps(x_t, E_theta(r)) - eps0(x_t, E_0(r)) ||^2 over a batch of
retain prompts r (on the same x_t). x_t comes from a DDIM rollout of the current model on the plain target
prompt, at the convention of DESIGN.md §3 step 3. The first ``warmup`` iterations train without the attack.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from erasekit.errors import ErasekitError, SettingError
from erasekit.families import Cond
from erasekit.families.base import Pipeline
from erasekit.families.slots import embedding_table
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, esd_target
from erasekit.methods.te_model import TE_LAYERS, TextEncoderModel, prepare_te
from erasekit.methods.trainer import Setup, train
from erasekit.result import ErasureResult

ATTACKS = ("pgd", "fast-at", "none")
# the reference's retain set is COCO object prompts; these are COCO classes in its "a photo of a ..." form
COCO_OBJECTS = ("person", "bicycle", "car", "airplane", "bus", "train", "boat", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
                "bear", "zebra", "giraffe", "umbrella", "chair", "couch", "bed", "table", "laptop", "clock", "vase", "book", "pizza", "cake")


@dataclass
class AdvUnlearnConfig(MethodConfig):
    """AdvUnlearn settings; defaults are the paper's (Zhang et al., NeurIPS 2024, and its reference code)."""

    iterations: int = field(default=1000, metadata={"help": "Outer (text-encoder) steps (AdvUnlearn: 1000)."})
    lr: float = field(default=1e-5, metadata={"help": "Adam learning rate of the text encoder (AdvUnlearn: 1e-5)."})
    te_layers: str = field(default="all", metadata={"help": "Text-encoder parameters to train: all (every layer, AdvUnlearn's default), attn, mlp, last."})
    attack: str = field(default="pgd", metadata={"help": "Inner attack: pgd (AdvUnlearn), fast-at (one signed step from a random start: its fast variant), none (= ESD through the text encoder)."})
    attack_steps: int = field(default=30, metadata={"help": "PGD steps of the inner attack (AdvUnlearn: 30)."})
    attack_tokens: int = field(default=1, metadata={"help": "Adversarial prefix tokens before the target prompt (AdvUnlearn: 1)."})
    attack_lr: float = field(default=1e-3, metadata={"help": "Signed-gradient step of the attack, in token-embedding units (AdvUnlearn: 1e-3)."})
    attack_init: str = field(default="latest", metadata={"help": "Start of each attack: latest (the previous iteration's prefix, AdvUnlearn's default) or random (a random token's embedding)."})
    warmup: int = field(default=200, metadata={"help": "First iterations without the attack (AdvUnlearn: 200)."})
    retain_weight: float = field(default=0.3, metadata={"help": "Weight of the utility-retaining loss (AdvUnlearn: 0.3)."})
    retain_prompts: str = field(default="coco", metadata={"help": "Retain set: coco (COCO object prompts, AdvUnlearn's), toy (the toy world's captions without the target), or a text file, one prompt per line."})
    retain_batch: int = field(default=5, metadata={"help": "Retain prompts per step (AdvUnlearn: 5)."})
    ddim_steps: int = field(default=50, metadata={"help": "DDIM steps of the rollout that produces x_t (reference: 50)."})
    start_guidance: float = field(default=3.0, metadata={"help": "CFG scale of the rollout (reference: 3)."})
    negative_guidance: float = field(default=1.0, metadata={"help": "eta of ESD's target (reference: 1)."})
    batch_size: int = field(default=1, metadata={"help": "Rollout points per step (AdvUnlearn: 1)."})
    precision: str = field(default="fp32", metadata={"help": "fp32 only for now (text-encoder training keeps the reference's precision)."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_LR, MAX_WEIGHT, check_between

        check_between("iterations", self.iterations, 1, MAX_ITERATIONS)
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="Adam's step; AdvUnlearn uses 1e-5")
        check_between("attack_steps", self.attack_steps, 1, 1000)
        check_between("attack_tokens", self.attack_tokens, 1, 20, why="prefix tokens before a 77-token prompt")
        check_between("attack_lr", self.attack_lr, 0.0, 10.0, low_open=True, why="a step in token-embedding units; AdvUnlearn uses 1e-3")
        check_between("warmup", self.warmup, 0, MAX_ITERATIONS)
        check_between("retain_weight", self.retain_weight, 0.0, MAX_WEIGHT, why="AdvUnlearn uses 0.3")
        check_between("retain_batch", self.retain_batch, 1, 1000)
        check_between("ddim_steps", self.ddim_steps, 1, 1000, why="the training timesteps")
        check_between("start_guidance", self.start_guidance, 0.0, MAX_GUIDANCE, why="a CFG scale; the reference uses 3")
        check_between("negative_guidance", self.negative_guidance, 0.0, MAX_GUIDANCE, why="ESD's eta; the reference uses 1")
        check_between("batch_size", self.batch_size, 1, 64)
        for name, value, allowed in (("te_layers", self.te_layers, TE_LAYERS), ("attack", self.attack, ATTACKS), ("attack_init", self.attack_init, ("latest", "random"))):
            if value not in allowed:
                raise SettingError(name, f"unknown {{name}} {value!r}; choose one of: {', '.join(allowed)}")
        if self.precision != "fp32":
            raise SettingError("precision", f"{{name}} {self.precision!r} is not supported by advunlearn; use fp32")


class RetainSource(Protocol):
    """A config that names a retain set (AdvUnlearn's, MACE's)."""

    retain_prompts: str
    seed: int


def retain_set(config: RetainSource, targets: list[str]) -> list[str]:
    """The retain prompts: COCO objects, the toy world's captions without the targets' words, or a file's lines."""
    if config.retain_prompts == "coco":
        return [f"a photo of a {obj}" for obj in COCO_OBJECTS if all(obj not in t.lower() for t in targets)]
    if config.retain_prompts == "toy":
        from erasekit.world.captions import caption, sample_example
        from erasekit.world.vocab import load_vocab, words_of

        vocab, rng = load_vocab(), np.random.default_rng(config.seed)
        banned = {w for t in targets for word in words_of(t) for w in (vocab.object_synonyms(word) if word in vocab.objects else (word,))}
        prompts = [caption(*sample_example(rng, i, vocab), rng, vocab) for i in range(400)]
        return [p for p in prompts if not banned & set(words_of(p))][:200]
    path = Path(config.retain_prompts)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingError("retain_prompts", f"{{name}} {path} cannot be read as UTF-8 text ({exc.__class__.__name__}); pass coco, toy or a text file, one prompt per line") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise SettingError("retain_prompts", f"{{name}} {path} holds no prompt; write one prompt per line (or pass coco or toy)")
    return prompts


class Prefixes:
    """The adversarial prefix embeddings per target ("latest" init carries them over); checkpointed with the weights."""

    def __init__(self, n_targets: int) -> None:
        self.embs: dict[int, torch.Tensor] = {}
        self.n_targets = n_targets
        self.attacks = 0

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors and metadata of a checkpoint."""
        return {str(j): e for j, e in self.embs.items()}, {"attacks": self.attacks}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Inverse of :meth:`state`."""
        self.embs = {int(k): v.clone() for k, v in tensors.items()}
        self.attacks = int(meta.get("attacks", 0))

    def summary(self) -> dict[str, Any]:
        """What the history file keeps."""
        return {"attacks": self.attacks}


def attack_prefix(s: Setup[AdvUnlearnConfig], tr: TextEncoderModel, prefixes: Prefixes, j: int, text: str, x: torch.Tensor, t: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """The inner attack: prefix embeddings (1 x N x width) that make the current model predict ``goal`` (the base's on the concept)."""
    cfg = s.config
    table = embedding_table(tr.encoder)
    fast = cfg.attack == "fast-at"
    if cfg.attack_init == "latest" and j in prefixes.embs and not fast:
        delta = prefixes.embs[j].clone()
    else:
        ids = torch.randint(table.shape[0], (cfg.attack_tokens,), generator=s.generator)
        delta = table[ids].float().clone()[None]
    for _ in range(1 if fast else cfg.attack_steps):
        delta.requires_grad_(True)
        pred = tr.eps(x, t, tr.encode_slots([text], delta))
        (grad,) = torch.autograd.grad(F.mse_loss(pred.float(), goal), delta)
        delta = (delta - cfg.attack_lr * grad.sign()).detach()
    prefixes.embs[j] = delta
    prefixes.attacks += 1
    return delta


def advunlearn_loop(s: Setup[AdvUnlearnConfig], progress: Progress | None, prefixes: Prefixes, retain: list[str], retain_base: Cond) -> None:
    """The bilevel iterations from ``s.done``: rollout, attack (after the warm-up), erase + retain step."""
    cfg = s.config
    tr = s.trainable
    assert isinstance(tr, TextEncoderModel)
    placeholder = " ".join(["a"] * cfg.attack_tokens)
    for step in range(s.done, cfg.iterations):
        s.between_steps = False
        s.optimizer.zero_grad(set_to_none=True)
        erase_sum, retain_sum = torch.zeros(()), torch.zeros(())
        for _ in range(cfg.batch_size):
            j = int(torch.randint(len(s.targets), (1,), generator=s.generator))
            (level,), start = s.draw_levels(1)
            with torch.no_grad():
                current = tr.encode([s.targets[j]])
            x = s.schedule.rollout(tr.eps, start, current, s.uncond, [level.steps], cfg.start_guidance)[0]
            t = torch.full((1,), level.t, device=x.device)
            e_null, e_c = tr.frozen_eps(torch.cat([x, x]), t.expand(2), Cond.cat([s.emb_null, s.emb_targets[j]])).float().chunk(2)
            attacked = cfg.attack != "none" and step >= cfg.warmup
            if attacked:
                text = f"{placeholder} {s.targets[j]}"
                cond = tr.encode_slots([text], attack_prefix(s, tr, prefixes, j, text, x, t, e_c))
            else:
                cond = tr.encode([s.targets[j]])
            erase = F.mse_loss(tr.eps(x, t, cond).float(), esd_target(e_null, e_c, cfg.negative_guidance))
            pick = torch.randperm(len(retain), generator=s.generator)[: cfg.retain_batch]
            n = len(pick)
            xs, ts = x.expand(n, *x.shape[1:]), t.expand(n)
            kept = F.mse_loss(tr.eps(xs, ts, tr.encode([retain[int(i)] for i in pick])).float(), tr.frozen_eps(xs, ts, retain_base[pick]).float())
            ((erase + cfg.retain_weight * kept) / cfg.batch_size).backward()
            erase_sum, retain_sum = erase_sum + erase.detach() / cfg.batch_size, retain_sum + kept.detach() / cfg.batch_size
        s.optimizer.step()
        record = {"step": step + 1, "target": s.targets[j], "erase_loss": round(erase_sum.item(), 6), "retain_loss": round(retain_sum.item(), 6), "attacked": attacked}
        s.end_step(step + 1, record, erase_sum, retain_sum, prefixes, progress)


def fit_advunlearn(pipe: Pipeline, request: ErasureRequest, config: AdvUnlearnConfig, progress: Progress | None) -> ErasureResult:
    """Erase ``request.targets`` by adversarial training of the text encoder (AdvUnlearn)."""
    if request.preserve:
        raise ErasekitError("advunlearn keeps concepts through its retain set, not --preserve; pass the prompts to keep as a retain_prompts file")
    retain = retain_set(config, list(request.targets))
    if not retain:
        raise SettingError("retain_prompts", "{name} leaves no prompt once the targets' are taken out; pass a file of prompts to keep")
    s = prepare_te(pipe, dataclasses.replace(request, release_unused=False), config, config.te_layers)
    from erasekit.concepts import encode_cond

    retain_base = encode_cond(pipe, retain)
    prefixes = Prefixes(len(s.targets))
    return train(s, dataclasses.replace(request, release_unused=False), "advunlearn",
                 lambda s, p: advunlearn_loop(s, p, prefixes, retain, retain_base), prefixes, 1, progress)
