"""TRCE (Chen et al., ICCV 2025): a closed-form edit of the prompt's end-of-text row, then contrastive early-step fine-tuning.

Stage 1: every cross-attention ``attn2.to_k``/``to_v`` W is solved so that the first [EoT] row of each malicious prompt c_i
reads as its safe counterpart's, W c_i ~ W0 s_i (the pair shares a template), with preserved prompts' rows kept and a
ridge toward W0 (the reference keeps COCO statistics instead; they cannot be downloaded here):
    W = (lam W0 + 1/N sum W0 s_i c_iᵀ + p/M sum W0 k_j k_jᵀ)(lam I + 1/N sum c_i c_iᵀ + p/M sum k_j k_jᵀ)⁻¹.
Stage 2: on the original model's own sampling trajectories under the malicious prompts, at an early step x (high noise),
the stage-1 model's self-attention and cross-attention queries are trained with a triplet hinge on squared distances:
    l(a) = max(0, d(a, p) - d(a, n) + margin), p / n = the original model's strongly guided prediction under the safe /
    malicious prompt (eps_c + g (eps_c - eps_0)), for a = eps_theta(x, malicious) and a = eps_theta(x, ''), averaged;
plus ``preserve_weight`` x MSE(eps_theta(x', ''), eps_stage1(x', '')) on trajectories of the empty prompt (any step).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from erasekit.concepts import check_prompt, encode_cond
from erasekit.errors import ErasekitError
from erasekit.families import Cond, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, TrainableModel, check_stages
from erasekit.methods.closed_form import EditRows, applied, as_delta, encoder_rows, relative_change, residuals, uce_edit, weights_of
from erasekit.methods.trainer import Setup, train
from erasekit.models import weights_hash
from erasekit.result import ErasureResult

# the reference's kind of templates (it draws 15 of 30 fixed ones); written here for this library
TEMPLATES = ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a drawing of {}", "a painting of {}", "a snapshot of {}",
             "a close-up of {}", "an illustration of {}", "a rendering of {}", "a sketch of {}", "a scene showing {}",
             "a depiction of {}", "a still of {}", "artwork of {}")


@dataclass
class TRCEConfig(MethodConfig):
    """TRCE settings; defaults are the reference's (ddgoodgood/TRCE, config/stage1 and stage2 for nudity)."""

    stage: str = field(default="both", metadata={"help": "both, 1 (closed form alone) or 2 (contrastive fine-tuning on a stage-1 result, see stage1)."})
    stage1: str = field(default="", metadata={"help": "Stage 2 alone: the trce stage-1 delta (file or run folder) to build on."})
    pairs: str = field(default="", metadata={"help": "Malicious -> safe phrases: a file of 'malicious<TAB>safe' lines, 'toy' (the toy world's), or '' (each target -> safe)."})
    safe: str = field(default="", metadata={"help": "The safe phrase each target maps to when pairs is '' (TRCE for nudity: 'a person wearing clothes'); '' = the empty prompt."})
    templates: int = field(default=15, metadata={"help": "Templates each pair is written into for stage 1 (TRCE: 15)."})
    retain: str = field(default="", metadata={"help": "Prompts whose rows stage 1 keeps: a file (one per line), 'toy', or '' (the request's preserve concepts only)."})
    lam: float = field(default=0.1, metadata={"help": "Ridge toward the original matrices (stands in for TRCE's COCO statistics)."})
    preserve_scale: float = field(default=1.0, metadata={"help": "Weight of the kept prompts' rows in stage 1, per row on average."})
    iterations: int = field(default=300, metadata={"help": "Stage-2 steps, one malicious trajectory each (TRCE nudity: 3 epochs of 100)."})
    lr: float = field(default=1e-6, metadata={"help": "Stage-2 AdamW learning rate (TRCE: 1e-6)."})
    seeds_per_prompt: int = field(default=5, metadata={"help": "Trajectories sampled per malicious phrase (TRCE: 5)."})
    ddim_steps: int = field(default=50, metadata={"help": "Sampler steps of the trajectories (TRCE: 50)."})
    early_steps: int = field(default=25, metadata={"help": "Stage 2 trains on the first this many steps from pure noise (TRCE: 25 of 50)."})
    guidance: float = field(default=3.0, metadata={"help": "CFG scale of the trajectories (TRCE: 3)."})
    ref_guidance: float = field(default=15.0, metadata={"help": "g of the references eps_c + g (eps_c - eps_0) (TRCE: 15)."})
    margin: float = field(default=0.01, metadata={"help": "Triplet margin (TRCE: 0.01)."})
    preserve_weight: float = field(default=100.0, metadata={"help": "Weight of the empty prompt's preservation (TRCE: 100)."})
    reg_trajectories: int = field(default=2000, metadata={"help": "Empty-prompt trajectories for the preservation loss (TRCE: 2000)."})
    reg_batch: int = field(default=4, metadata={"help": "Empty-prompt states per step (TRCE: 4)."})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay (TRCE: 1e-2)."})
    train_method: str = field(default="full", metadata={"help": "Stage 2 trains self-attention and the cross-attention queries (TRCE); stage 1 edits attn2.to_k/to_v; only 'full' names their union."})
    batch_size: int = field(default=1, metadata={"help": "Malicious trajectories per stage-2 step (TRCE: 1)."})
    precision: str = field(default="fp32", metadata={"help": "fp32 only."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_LR, MAX_SCALE, MAX_WEIGHT, MIN_REGULARISER, check_between

        check_stages(self.stage, self.stage1, "TRCE's stage-1 edit", "a trce --stage 1 delta")
        for name in ("iterations", "seeds_per_prompt", "reg_trajectories", "reg_batch", "templates"):
            check_between(name, getattr(self, name), 1, MAX_ITERATIONS)
        check_between("templates", self.templates, 1, len(TEMPLATES), why=f"{len(TEMPLATES)} are built in")
        check_between("ddim_steps", self.ddim_steps, 1, 1000)
        check_between("early_steps", self.early_steps, 1, self.ddim_steps, why="steps of the trajectory")
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="TRCE uses 1e-6")
        check_between("lam", self.lam, MIN_REGULARISER, MAX_SCALE, why="it keeps the solve well posed")
        check_between("preserve_scale", self.preserve_scale, 0.0, MAX_SCALE)
        check_between("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        check_between("ref_guidance", self.ref_guidance, 0.0, MAX_GUIDANCE)
        check_between("margin", self.margin, 0.0, MAX_SCALE)
        check_between("preserve_weight", self.preserve_weight, 0.0, MAX_WEIGHT)
        check_between("weight_decay", self.weight_decay, 0.0, 1.0)
        if self.train_method != "full" or self.batch_size != 1 or self.precision != "fp32":
            raise ErasekitError("trce's parameter sets are fixed (stage 1: attn2.to_k/to_v; stage 2: self-attention and attn2.to_q), one fp32 trajectory per step; drop --train-method, --batch-size and --precision")


def toy_pairs() -> list[tuple[str, str]]:
    """The toy world's malicious -> safe phrases: the skull named, and every other indirect word (the rest stay unseen)."""
    from erasekit.world.vocab import load_vocab

    vocab = load_vocab()
    objects, colours = vocab.objects, vocab.colours
    implicit = vocab.raw["implicit"]
    out = []
    for i, phrase in enumerate(implicit["named_phrases"]):
        obj, colour = objects[i % len(objects)], colours[i % len(colours)]
        out.append((f"a {colour} {obj} {phrase}", f"a {colour} {obj}"))
    for i, word in enumerate(vocab.indirect_words[::2]):
        obj, colour = objects[(3 * i + 1) % len(objects)], colours[(i + 2) % len(colours)]
        article = "an" if word[0] in "aeiou" else "a"
        out.append((f"{article} {word} {colour} {obj}", f"a {colour} {obj}"))
    return out


def _lines(path: str, what: str, strip: bool = True) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise ErasekitError(f"no {what} file at {path}; give a text file, one entry per line")
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    return [line.strip() for line in lines] if strip else lines


def read_pairs(config: TRCEConfig, targets: list[str]) -> list[tuple[str, str]]:
    """The malicious -> safe phrase pairs the config names."""
    if config.pairs == "toy":
        return toy_pairs()
    if not config.pairs:
        return [(t, config.safe.strip()) for t in targets]
    pairs = []
    for line in _lines(config.pairs, "pairs", strip=False):
        bad, _, good = line.partition("\t")
        if not bad.strip():
            raise ErasekitError(f"{config.pairs}: each line is 'malicious<TAB>safe' (the safe side may be empty), got {line!r}")
        pairs.append((bad.strip(), good.strip()))
    return pairs


def retained(config: TRCEConfig, preserve: list[str]) -> list[str]:
    """The prompts whose rows stage 1 keeps."""
    if config.retain == "toy":
        from erasekit.world.captions import neutral_prompts, object_prompt
        from erasekit.world.vocab import load_vocab

        extra = [object_prompt(o) for o in load_vocab().objects] + neutral_prompts()
    else:
        extra = _lines(config.retain, "retain") if config.retain else []
    return list(dict.fromkeys([*preserve, *extra]))


def eot_rows(pipe: Pipeline, texts: list[str]) -> torch.Tensor:
    """Each text's first end-of-text row of the text encoder's output (float64, N x d)."""
    emb = encoder_rows(pipe, texts)
    rows = [len(pipe.tokenizer(t, truncation=True, max_length=pipe.tokenizer.model_max_length).input_ids) - 1 for t in texts]
    return torch.stack([emb[i, r] for i, r in enumerate(rows)])


def stage1_weights(pipe: Pipeline, config: TRCEConfig, pairs: list[tuple[str, str]], keep: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 1's edited ``attn2.to_k``/``to_v`` (float64) and its record."""
    templates = TEMPLATES[: config.templates]
    bad = [tpl.format(m) for m, _ in pairs for tpl in templates]
    good = [tpl.format(s) if s else "" for _, s in pairs for tpl in templates]
    for text in set(bad) | {g for g in good if g}:
        check_prompt(pipe, text, "TRCE prompt")
    d = eot_rows(pipe, bad[:1]).shape[1]
    kept = encoder_rows(pipe, keep).flatten(0, 1) if keep else torch.zeros(0, d, dtype=torch.float64)
    rows = EditRows(eot_rows(pipe, bad), eot_rows(pipe, good), kept)
    original = weights_of(pipe)
    edited = uce_edit(original, rows, config.lam, 1.0 / len(bad), config.preserve_scale / max(len(kept), 1))
    erase, keep_loss = residuals(edited, original, rows)
    return edited, {"stage": 1, "prompts": len(bad), "kept_rows": len(kept), "erase_residual": round(erase, 8),
                    "preserve_residual": round(keep_loss, 8), "relative_change": relative_change(edited, original)}


def stage2_parameters(pipe: Pipeline) -> list[str]:
    """Stage 2's trainable set: every self-attention parameter and the cross-attention queries (TRCE's)."""
    family = family_of(pipe)
    return [n for n in family.parameters(family.denoiser(pipe), "full") if "attn1." in n or ".attn2.to_q." in f".{n}"]


@dataclass
class Trajectories:
    """The original model's sampling states: malicious ones at the early steps, one state per empty-prompt trajectory."""

    states: torch.Tensor  # (n, early_steps, *latent)
    prompt: list[int]  # per malicious trajectory, its pair
    reg_states: torch.Tensor  # (m, *latent)
    reg_steps: list[int]


@torch.no_grad()
def sample_trajectories(pipe: Pipeline, config: TRCEConfig, prompts: list[str], generator: torch.Generator) -> Trajectories:
    """Sample the original model under each malicious prompt (``seeds_per_prompt`` each) and under the empty prompt."""
    family = family_of(pipe)
    model, schedule = family.denoiser(pipe), family.schedule(pipe, config.ddim_steps)
    shape = family.latent_shape(pipe)[1:]
    device = next(model.parameters()).device
    uncond = family.uncond(pipe)

    def roll(texts: list[str], kept: list[int], pick: list[int] | None = None) -> list[torch.Tensor]:
        """Per chunk of 16 texts their states at ``kept`` steps, or (``pick``) only each text's own step, chunk by chunk."""
        out = []
        for start in range(0, len(texts), 16):
            chunk = texts[start : start + 16]
            noise = torch.randn((len(chunk), *shape), generator=generator).to(device)
            states = torch.stack(schedule.rollout(lambda x, t, c: family.predict(model, x, t, c), noise, encode_cond(pipe, chunk), uncond, kept, config.guidance), dim=1)
            out.append(states if pick is None else states[torch.arange(len(chunk)), torch.tensor(pick[start : start + len(chunk)])])
        return out

    order = [i for i in range(len(prompts)) for _ in range(config.seeds_per_prompt)]
    states = torch.cat(roll([prompts[i] for i in order], list(range(config.early_steps))))
    reg_steps = [int(torch.randint(config.ddim_steps, (1,), generator=generator)) for _ in range(config.reg_trajectories)]
    reg = torch.cat(roll([""] * config.reg_trajectories, list(range(config.ddim_steps)), reg_steps))
    return Trajectories(states, order, reg, reg_steps)


class Stage2Model(TrainableModel):
    """The stage-1 model with stage 2's set trainable; its delta carries both stages, ``restore`` undoes both."""

    def setup_stages(self, names: list[str], stage1: dict[str, torch.Tensor], previous: dict[str, torch.Tensor]) -> None:
        """Narrow the trainable set to ``names``; remember stage 1's matrices and what they replaced."""
        self.narrow(names)
        self.stage1, self.previous = stage1, previous
        self.base = {**self.originals, **{f"inner.{n}": w for n, w in previous.items()}}

    def base_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The original model's output (neither stage)."""
        with torch.inference_mode():
            out = functional_call(self.call, self.base, (x, t, cond), strict=False)
        return out.clone()

    def delta(self) -> tuple[dict[str, torch.Tensor], str]:
        """Stage 2's tensors and stage 1's matrices."""
        own, kind = super().delta()
        return {**as_delta(self.stage1, self.unet, self.prefix), **own}, kind

    def restore(self) -> None:
        """Put back stage 2's parameters and the matrices stage 1 replaced."""
        super().restore()
        applied(self.unet, self.previous)


def guided(e_c: torch.Tensor, e_0: torch.Tensor, g: float) -> torch.Tensor:
    """TRCE's reference prediction: e_c + g (e_c - e_0)."""
    return e_c + g * (e_c - e_0)


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> torch.Tensor:
    """max(0, d(a, p) - d(a, n) + margin), d the mean squared distance."""
    return F.relu(F.mse_loss(anchor, positive) - F.mse_loss(anchor, negative) + margin)


def stage2_loop(s: Setup[TRCEConfig], data: Trajectories, pairs: tuple[Cond, Cond], progress: Progress | None) -> None:
    """TRCE's contrastive steps (malicious trajectories in order, a random early step each) from ``s.done`` on."""
    cfg, tr, schedule = s.config, s.trainable, s.schedule
    assert isinstance(tr, Stage2Model)
    bad, good = pairs
    null = s.emb_null
    for step in range(s.done, cfg.iterations):
        s.between_steps = False
        i = step % len(data.prompt)
        k = int(torch.randint(cfg.early_steps, (1,), generator=s.generator))
        x, t = data.states[i, k][None], schedule.grid_time(k).reshape(1).to(data.states.device)
        j = data.prompt[i]
        base = tr.base_eps(x.expand(3, *x.shape[1:]), t.expand(3), Cond.cat([null, bad[j], good[j]]))
        e_null, e_bad, e_good = base.chunk(3)
        positive, negative = guided(e_good, e_null, cfg.ref_guidance), guided(e_bad, e_null, cfg.ref_guidance)
        anchors = tr.eps(x.expand(2, *x.shape[1:]), t.expand(2), Cond.cat([bad[j], null]))
        erase = torch.stack([triplet(a[None], positive, negative, cfg.margin) for a in anchors]).mean()
        idx = [(step * cfg.reg_batch + b) % len(data.reg_steps) for b in range(cfg.reg_batch)]
        x_r = data.reg_states[idx]
        t_r = torch.stack([schedule.grid_time(data.reg_steps[b]) for b in idx]).to(x_r.device)
        keep = F.mse_loss(tr.eps(x_r, t_r, null.expand(len(idx))), tr.frozen_eps(x_r, t_r, null.expand(len(idx))))
        s.optimizer.zero_grad(set_to_none=True)  # the reference never zeroes them (they pile up); this does
        (erase + cfg.preserve_weight * keep).backward()
        s.optimizer.step()
        record = {"step": step + 1, "erase_loss": round(erase.item(), 6), "preserve_loss": round(keep.item(), 6), "early_step": k}
        s.end_step(step + 1, record, erase.detach(), keep.detach(), None, progress)


def _stage1_from(path: str, pipe: Pipeline, base_hash: str) -> dict[str, torch.Tensor]:
    """The stage-1 matrices of a saved trce stage-1 result, refusing anything else."""
    from erasekit.result import load_result

    earlier = load_result(path)
    if earlier.method != "trce" or earlier.config.get("stage") != "1":
        raise ErasekitError(f"{path} is a {earlier.method} result{' (stage ' + str(earlier.config.get('stage')) + ')' if earlier.method == 'trce' else ''}, not a trce stage-1 one; run `erasekit erase --method trce --set stage=1` first")
    if earlier.base_hash != base_hash:
        raise ErasekitError(f"{path} was made on another base model; run stage 1 on this model first")
    family = family_of(pipe)
    prefix = family.prefix + "."
    return {k.removeprefix(prefix): v.to(torch.float64) for k, v in earlier.weights.items()}


def fit_trce(pipe: Pipeline, request: ErasureRequest, config: TRCEConfig, progress: Progress | None) -> ErasureResult:
    """TRCE's stages as configured; the pipeline is left unchanged."""
    from erasekit.methods.base import make_result

    started = time.perf_counter()
    family = family_of(pipe)
    if family.name != "sd":
        raise ErasekitError(f"trce edits CLIP's end-of-text row in SD's cross-attention; the {family.name} family is not supported (use uce or esd-x)")
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    base_hash = request.base_hash or weights_hash(pipe)
    pairs = read_pairs(config, targets)
    keep = retained(config, [check_prompt(pipe, p, "preserve concept") for p in request.preserve])
    if config.stage == "2":
        stage1, record = _stage1_from(config.stage1, pipe, base_hash), {"stage": 1, "from": config.stage1}
    else:
        stage1, record = stage1_weights(pipe, config, pairs, keep)
    if progress:
        progress(0 if config.stage != "1" else 1, config.iterations if config.stage != "1" else 1, record)
    if config.stage == "1":
        delta = as_delta(stage1, family.denoiser(pipe), family.prefix)
        return make_result(pipe, request, "trce", config, delta, history=[record], timings={"total_s": round(time.perf_counter() - started, 3)},
                           concepts=tuple(targets), preserve=tuple(request.preserve))
    generator = torch.Generator().manual_seed(config.seed)
    bad = [p[0] for p in pairs]
    data = sample_trajectories(pipe, config, bad, generator)  # by the original model, before stage 1 is written
    conds = (encode_cond(pipe, bad), encode_cond(pipe, [p[1] for p in pairs]))
    previous = applied(family.denoiser(pipe), stage1)
    try:
        trainable = Stage2Model(pipe, "full", lora_rank=0)
        trainable.setup_stages(stage2_parameters(pipe), stage1, previous)
    except BaseException:
        applied(family.denoiser(pipe), previous)
        raise
    s: Setup[TRCEConfig] = Setup(
        pipe=pipe, config=config, targets=targets, preserve=list(request.preserve), emb_null=family.uncond(pipe),
        emb_targets=encode_cond(pipe, targets), emb_preserve=None, family=family, schedule=family.schedule(pipe, config.ddim_steps),
        trainable=trainable, optimizer=torch.optim.AdamW(list(trainable.params.values()), lr=config.lr, weight_decay=config.weight_decay),
        generator=generator, base_hash=base_hash, started=started,
    )
    s.history.append({**record, "pairs": len(pairs), "trajectories": len(data.prompt)})
    return train(s, request, "trce", lambda s, progress: stage2_loop(s, data, conds, progress), None, 1, progress)
