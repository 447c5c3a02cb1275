"""RealEra (Liu et al., 2024, arXiv 2410.09140): erase the concept's semantic neighbourhood, not only its word.

1. *Neighbour mining*: the concept's token embedding w is perturbed, w + d with |d| <= ``radius`` |w|, and a
   perturbation is kept when its cosine to w lies in the band [``band_low``, ``band_high``]: ``n_mined`` associated
   embeddings that no word spells but that sit where the concept's paraphrases and synonyms would.
2. *Beyond-concept regulariser*: the ``n_beyond`` words nearest to w whose token embedding's cosine lies *below* the
   band are the concepts just outside the neighbourhood; both stages keep them. (Perturbations past the bound are no
   stand-in for them: on the toy world those still draw the concept or its look-alike, measured.)
3. *Closed-form stage* (``closed_form``): a UCE edit of every cross-attention key/value map sending the rows of the
   concept and of each mined embedding (its token through the end-of-text and padding rows) to the guide's rows,
   the beyond words' rows, the retain prompts' and the empty prompt's kept.
4. *Noise-alignment stage*: the cross-attention weights, starting from the closed-form edit, are fine-tuned so the
   prediction under the concept and each mined embedding follows ESD's negatively guided target of the original
   model, while the beyond words keep the original model's prediction (weight ``preserve_weight``).

The paper fine-tunes a LoRA in stage 4; here the same cross-attention weights train directly, so the closed-form
edit and the fine-tuning leave one ``weights`` delta. Built from the paper's description; no code was read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from erasekit.errors import ErasekitError, SettingError
from erasekit.families import Cond, family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress, TrainConfig
from erasekit.result import ErasureResult

# the concept first (its tokens are the slots at positions 1..N), then context
TEMPLATES = ("{}", "{}, an image", "{}, a picture", "{}, a drawing")


@dataclass
class RealEraConfig(TrainConfig):
    """RealEra: mine the concept's neighbour embeddings, erase them with it (closed form, then fine-tuning), keep the words beyond."""

    n_mined: int = field(default=16, metadata={"help": "Associated embeddings mined around the concept's token embedding (our default; the paper's count is not restated here)."})
    radius: float = field(default=2.5, metadata={"help": "Distance bound of a perturbation: |d| <= radius x |w| (our default, set for CLIP token embeddings)."})
    band_low: float = field(default=0.4, metadata={"help": "Lower end of the cosine band a mined embedding's cosine to w lies in; words below it are beyond the concept (our default)."})
    band_high: float = field(default=0.95, metadata={"help": "Upper end of the cosine band (leaves out near-copies of w; our default)."})
    n_beyond: int = field(default=16, metadata={"help": "Words just below the band (nearest first) kept unchanged: the beyond-concept regulariser."})
    beyond: str = field(default="vocab", metadata={"help": "Where the beyond-concept words come from: vocab (the tokenizer's whole words), toy (the toy world's words), or a text file, one per line."})
    guide: str = field(default="", metadata={"help": "What the closed-form stage maps the neighbourhood to (default: the empty prompt)."})
    closed_form: bool = field(default=True, metadata={"help": "Run the closed-form stage before the fine-tuning."})
    lam: float = field(default=0.5, metadata={"help": "Closed-form regulariser toward the original weights (UCE's lambda)."})
    preserve_scale: float = field(default=1.0, metadata={"help": "Closed-form weight of the kept rows (beyond words, retain prompts, '')."})
    retain_prompts: str = field(default="coco", metadata={"help": "Prompts the closed-form stage keeps: coco (COCO object prompts), toy (the toy world's captions without the concept), a text file, or none."})

    def validate(self) -> None:
        """One-line refusals of values that cannot run."""
        from erasekit.checks import check_between

        super().validate()
        if self.train_method == "lora":
            raise SettingError("train_method", "realera trains the weights its closed-form stage edits; {name} lora is not supported, use xattn")
        check_between("n_mined", self.n_mined, 0, 4096)
        check_between("radius", self.radius, 1e-4, 10.0)
        check_between("band_low", self.band_low, -1.0, 1.0)
        check_between("band_high", self.band_high, -1.0, 1.0)
        if self.band_low >= self.band_high:
            raise SettingError("band_low", f"{{name}} {self.band_low} must be below band_high {self.band_high}")
        check_between("n_beyond", self.n_beyond, 0, 4096)
        check_between("lam", self.lam, 1e-6, 1e6, why="UCE's regulariser")
        check_between("preserve_scale", self.preserve_scale, 0.0, 1e6)


def concept_rows(pipe: Pipeline, concept: str) -> torch.Tensor:
    """The concept's token embeddings in every slot encoder, side by side (N tokens x width)."""
    family = family_of(pipe)
    ids = pipe.tokenizer(concept, add_special_tokens=False, return_tensors="pt").input_ids[0]
    return family.slot_rows(pipe, ids)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of flattened rows: ``a`` (M x N x width) against ``b`` (N x width)."""
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten()[None], dim=1)


def perturb(w: torch.Tensor, n: int, sizes: tuple[float, float], band: tuple[float, float], generator: torch.Generator, what: str) -> torch.Tensor:
    """``n`` perturbations w + d, |d| / |w| uniform in ``sizes``, whose cosine to ``w`` lies in ``band`` (n x N x width)."""
    kept: list[torch.Tensor] = []
    for _ in range(200):
        if sum(len(k) for k in kept) >= n:
            break
        d = torch.randn((256, *w.shape), generator=generator).to(w.device)  # drawn on the CPU: the same draws on any device
        size = (sizes[0] + torch.rand(256, generator=generator).to(w.device) * (sizes[1] - sizes[0])) * w.norm()
        cand = w[None] + d / d.flatten(1).norm(dim=1).view(-1, 1, 1) * size.view(-1, 1, 1)
        c = cosine(cand, w)
        kept.append(cand[(c >= band[0]) & (c <= band[1])])
    found = torch.cat(kept)[:n] if kept else w[None, :0]
    if len(found) < n:
        raise SettingError("band_low", f"only {len(found)} of {n} {what} perturbations at distance {sizes[0]:g}-{sizes[1]:g} x |w| land in the cosine "
                           f"band [{band[0]:g}, {band[1]:g}]; widen the band or change the radius")
    return found


def mine(w: torch.Tensor, config: RealEraConfig, generator: torch.Generator) -> torch.Tensor:
    """The associated embeddings: perturbations within the distance bound whose cosine to ``w`` lies inside the band."""
    return perturb(w, config.n_mined, (0.0, config.radius), (config.band_low, config.band_high), generator, "associated")


def beyond_words(pipe: Pipeline, w: torch.Tensor, concept: str, config: RealEraConfig) -> list[str]:
    """The ``n_beyond`` words nearest to ``w`` (mean token embedding) whose cosine lies below the band; the concept's own words left out."""
    from pathlib import Path

    if config.n_beyond == 0:
        return []
    own = {x.lower() for x in concept.split()} | {concept.lower()}
    if config.beyond == "vocab":
        pool = sorted({t.removesuffix("</w>") for t in pipe.tokenizer.get_vocab() if t.endswith("</w>")})
        pool = [x for x in pool if x.isalpha() and len(x) >= 3]
    elif config.beyond == "toy":
        from erasekit.world.vocab import load_vocab

        vocab = load_vocab()
        pool = sorted({s for o in vocab.objects for s in vocab.object_synonyms(o)} | set(vocab.colours) | set(vocab.styles)
                      | {p for words in vocab.raw["pair_words"].values() for p in words})
    else:
        try:
            pool = [line.strip() for line in Path(config.beyond).read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingError("beyond", f"{{name}} {config.beyond} cannot be read as UTF-8 text ({exc.__class__.__name__}); pass vocab, toy, or a text file, one word per line") from None
    pool = [x for x in pool if x.lower() not in own and not (set(x.lower().split()) & own)]
    if not pool:
        return []
    family = family_of(pipe)
    if config.beyond == "vocab":
        ids = pipe.tokenizer.get_vocab()
        rows = family.slot_rows(pipe, torch.tensor([ids[x + "</w>"] for x in pool]))
    else:
        rows = torch.stack([family.slot_rows(pipe, pipe.tokenizer(x, add_special_tokens=False, return_tensors="pt").input_ids[0]).mean(0) for x in pool])
    sims = torch.nn.functional.cosine_similarity(rows, w.mean(0)[None], dim=1)
    order = torch.argsort(sims, descending=True)
    return [pool[int(i)] for i in order if float(sims[i]) < config.band_low][: config.n_beyond]


def mined_conds(pipe: Pipeline, concept: str, mined: torch.Tensor) -> Cond:
    """The conditioning of each mined embedding in every template (mined x templates rows, templates fastest)."""
    family = family_of(pipe)
    prompts = [t.format(concept) for t in TEMPLATES]
    parts = []
    with torch.no_grad():
        for m in mined:
            slots = m[None].expand(len(prompts), *m.shape)
            parts.append(family.encode_with_slots(pipe, prompts, slots))
    return Cond.cat(parts)


def through_eos(hidden: torch.Tensor, start: int, guide: torch.Tensor, guide_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows from ``start`` to the end of ``hidden`` (R x d) aligned with the guide's rows from ``guide_start`` (UCE's old-code keys)."""
    shift = start - guide_start
    end = hidden.shape[0]
    if shift >= 0:
        return hidden[start:end], guide[guide_start : end - shift]
    return hidden[start : end + shift], guide[guide_start:end]


def closed_form_rows(pipe: Pipeline, concept: str, conds: Cond | None, beyond: Sequence[str], config: RealEraConfig, retain: Sequence[str] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(erase keys, guide rows, keep keys) of one concept: its own and the mined rows through EOS, the guide's aligned; every row of
    the beyond words (in the templates), the retain prompts and ''."""
    from erasekit.concepts import encode
    from erasekit.methods.closed_form import last_token_index

    n = len(pipe.tokenizer(concept, add_special_tokens=False).input_ids)
    guide = encode(pipe, [config.guide]).to(dtype=torch.float64, device="cpu")[0]
    g0 = last_token_index(pipe, config.guide)
    hidden = encode(pipe, [t.format(concept) for t in TEMPLATES]).to(dtype=torch.float64, device="cpu")
    if conds is not None:
        hidden = torch.cat([hidden, conds.parts["hidden"].to(dtype=torch.float64, device="cpu")])
    pairs = [through_eos(h, n, guide, g0) for h in hidden]
    kept = ["", *retain, *(t.format(b) for b in beyond for t in TEMPLATES)]
    keep = encode(pipe, kept).to(dtype=torch.float64, device="cpu").flatten(0, 1)
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]), keep


def fit_realera(pipe: Pipeline, request: ErasureRequest, config: RealEraConfig, progress: Progress | None) -> ErasureResult:
    """Mine each concept's neighbourhood, edit it away in closed form, then fine-tune the cross-attention to erase it."""
    from erasekit.concepts import encode_cond
    from erasekit.methods.loop import finetune
    from erasekit.methods.trainer import prepare

    if request.preserve:
        raise ErasekitError("realera keeps what lies just beyond the concept's neighbourhood itself (n_beyond); drop --preserve")
    from erasekit.methods.advunlearn import retain_set
    from erasekit.methods.closed_form import EditRows, uce_edit, weights_of

    retain = [] if config.retain_prompts == "none" else retain_set(config, list(request.targets))
    generator = torch.Generator().manual_seed(config.seed)
    names: list[str] = []
    conds: list[Cond] = []
    kept: list[str] = []
    kept_conds: list[Cond] = []
    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for concept in request.targets:
        w = concept_rows(pipe, concept)
        near = mine(w, config, generator)
        found = mined_conds(pipe, concept, near) if len(near) else None
        words = [b for b in beyond_words(pipe, w, concept, config) if b not in kept]
        if config.closed_form:
            rows.append(closed_form_rows(pipe, concept, found, words, config, retain if not rows else []))
        names += [concept] + [f"{concept} (mined {i})" for i in range(len(near) * len(TEMPLATES))]
        conds += [encode_cond(pipe, [concept])] + ([found] if found is not None else [])
        if words:
            kept += words
            kept_conds.append(encode_cond(pipe, words))
    edit = {}
    if rows:  # one edit for every concept at once
        parts = [torch.cat([r[i] for r in rows]) for i in range(3)]
        edit = uce_edit(weights_of(pipe), EditRows(*parts), config.lam, 1.0, config.preserve_scale)
    s = prepare(pipe, request, config)
    s.targets, s.emb_targets = names, Cond.cat(conds)
    if kept_conds:  # the beyond-concept regulariser: the preservation term of the fine-tuning
        s.preserve, s.emb_preserve = kept, Cond.cat(kept_conds)
    with torch.no_grad():  # the fine-tuning starts from the edit; its frozen reference stays the original model
        for name, weight in edit.items():
            s.trainable.params[name].copy_(weight.to(s.trainable.params[name]))
    result = finetune(pipe, request, config, progress, method="realera", loss_space="eps", setup=s)
    summary = {"neighbourhood": {"mined": len(names) - len(request.targets), "beyond": kept, "closed_form": bool(edit)}}
    return dataclasses.replace(result, concepts=tuple(request.targets), preserve=(), history=(*result.history, summary))
