"""UCE (Gandikota et al., WACV 2024): a closed-form edit of the linear maps that read the text conditioning.

Targets' keys are mapped to the guide's values while a preserve set keeps its own (DESIGN.md §3b). The
reference repository has two versions that differ in which encoder rows are keys; ``key_rows`` offers both.
On SD/SDXL the maps are every cross-attention ``attn2.to_k``/``to_v``; on SD3/FLUX.1, whose joint attention
re-computes the text stream in every block, the transformer's ``context_embedder`` (its weight, not its
bias), the one map applied to the encoders' states; keys are rows of the family's ``hidden`` states.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from erasekit.concepts import check_prompt, concept_space
from erasekit.errors import ErasekitError
from erasekit.families import family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, make_result
from erasekit.methods.closed_form import ART_TEMPLATES, KEY_ROWS, OBJECT_TEMPLATES, as_delta, edit_rows, relative_change, residuals, uce_edit, weights_of
from erasekit.methods.eap import exclusions
from erasekit.models import weights_hash
from erasekit.result import ErasureResult

CONCEPT_TYPES = ("object", "art")


@dataclass
class UCEConfig(MethodConfig):
    """UCE settings; defaults are the repository's current script (trainscripts/uce_sd_erase.py)."""

    lam: float = field(default=0.5, metadata={"help": "lambda: weight pulling each matrix back to its original (UCE code: 0.5)."})
    erase_scale: float = field(default=1.0, metadata={"help": "s_e: weight of the erase terms (UCE code: 1)."})
    preserve_scale: float = field(default=1.0, metadata={"help": "s_p: weight of the preserve terms (new code: 1); negative = the old code's max(0.1, 1/|retain|)."})
    concept_type: str = field(default="object", metadata={"help": "object or art: picks the default guide and the prompt templates (UCE code)."})
    guide: str = field(default="auto", metadata={"help": "Concept the targets are mapped to; auto = '' for objects, 'art' for artists (UCE code)."})
    key_rows: str = field(default="last-token", metadata={"help": "Encoder rows used as keys: last-token (new code: one row per concept; SD3: its CLIP row and its T5 row) or through-eos (old code: last word token through EOS and padding, aligned to the guide, in each text part (CLIP, T5); preserved prompts keep every row)."})
    retain_empty: bool = field(default=False, metadata={"help": "Always preserve the empty prompt '' (old code: yes; new code: no)."})
    expand_prompts: bool = field(default=False, metadata={"help": "Also erase templated prompts ('image of {c}' ..., 'art by {c}' ...), each toward the same template of the guide ('image of {guide}'), as the current reference's uce_sd_erase.py --expand_prompts does (off there by default)."})
    preserve_file: str = field(default="", metadata={"help": "Word-list file (or 'toy') of extra concepts to preserve, targets and their synonyms removed (the old code preserved all other artists)."})
    edit_keys: bool = field(default=True, metadata={"help": "Edit attn2.to_k as well as attn2.to_v (UCE code: yes); no meaning on SD3/FLUX.1, whose one edited matrix is context_embedder."})
    train_method: str = field(default="xattn", metadata={"help": "Parameters UCE may change: only xattn (it edits attn2.to_k/to_v on SD/SDXL, context_embedder.weight on SD3/FLUX.1, and nothing else)."})

    def validate(self) -> None:
        """Refuse values the closed form cannot use, with one-line messages."""
        super().validate()
        name = type(self).__name__.removesuffix("Config").lower()
        if self.train_method != "xattn":
            raise ErasekitError(f"{name} edits only the text-reading matrices in closed form (attn2.to_k/to_v; context_embedder on SD3/FLUX.1); it cannot edit train_method={self.train_method!r} (use xattn)")
        from erasekit.checks import MAX_SCALE, MIN_REGULARISER, check_between, check_scale

        check_between("lam", self.lam, MIN_REGULARISER, MAX_SCALE, why="it keeps the solve well posed; UCE uses 0.5, RECE 0.1")
        check_between("erase_scale", self.erase_scale, 0.0, MAX_SCALE, low_open=True, why="the erase terms' weight; UCE uses 1")
        check_scale("preserve_scale", self.preserve_scale)
        if self.key_rows not in KEY_ROWS:
            raise ErasekitError(f"unknown key_rows {self.key_rows!r}; choose one of: {', '.join(KEY_ROWS)}")
        if self.concept_type not in CONCEPT_TYPES:
            raise ErasekitError(f"unknown concept_type {self.concept_type!r}; choose one of: {', '.join(CONCEPT_TYPES)}")


@dataclass(frozen=True)
class Prompts:
    """What a closed-form edit moves and keeps, resolved from the request and the config."""

    targets: list[str]
    erase: list[str]
    guides: list[str]
    retain: list[str]
    preserve_scale: float

    @property
    def guide(self) -> str:
        """The (single) guide concept."""
        return self.guides[0]


def resolve_prompts(pipe: Pipeline, request: ErasureRequest, config: UCEConfig) -> Prompts:
    """Targets, templated erase prompts with their guides, and the retained prompts; one-line errors on bad input."""
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    if not targets:
        raise ErasekitError("no concept to erase; give at least one")
    guide = ("art" if config.concept_type == "art" else "") if config.guide == "auto" else config.guide.strip()
    lowered = {t.lower() for t in targets}
    if guide.lower() in lowered:
        raise ErasekitError(f"the guide {guide!r} is the concept being erased; map it to another concept ('' or a neighbour)")
    preserve = [check_prompt(pipe, p, "preserve concept") for p in request.preserve]
    clash = sorted(lowered & {p.lower() for p in preserve})
    if clash:
        raise ErasekitError(f"{clash[0]!r} is both erased and preserved; remove it from the preserve list")
    if config.preserve_file:
        exclude = exclusions(targets, pipe)
        extra = [w for w in concept_space(config.preserve_file, pipe).words if w.lower() not in exclude]
        if not extra:
            raise ErasekitError(f"the preserve set from {config.preserve_file} is empty once the targets are removed; list other concepts")
        preserve = list(dict.fromkeys(preserve + extra))
    retain = ([""] if config.retain_empty else []) + preserve
    templates = (ART_TEMPLATES if config.concept_type == "art" else OBJECT_TEMPLATES) if config.expand_prompts else ()
    # as the current reference (trainscripts/uce_sd_erase.py): 'image of {c}' is guided to 'image of {guide}'
    erase = [p for t in targets for p in [t, *(tpl.format(t) for tpl in templates)]]
    guides = [p for _ in targets for p in [guide, *(tpl.format(guide) for tpl in templates)]]
    scale = config.preserve_scale if config.preserve_scale >= 0 else max(0.1, 1 / max(len(retain), 1))
    return Prompts(targets, erase, guides, retain, scale)


def result(
    pipe: Pipeline, method: str, prompts: Prompts, request: ErasureRequest, weights: dict[str, torch.Tensor],
    config: UCEConfig, base_hash: str, history: list[dict], started: float,
) -> ErasureResult:
    """Package edited matrices as an ErasureResult (kind ``weights``, keys prefixed as the family's denoiser)."""
    family = family_of(pipe)
    delta = as_delta(weights, family.denoiser(pipe), family.prefix)
    return make_result(
        pipe, dataclasses.replace(request, base_hash=base_hash), method, config, delta, history=history,
        timings={"total_s": round(time.perf_counter() - started, 3)}, concepts=tuple(prompts.targets),
        preserve=tuple(p for p in prompts.retain if p),
    )


def fit_uce(pipe: Pipeline, request: ErasureRequest, config: UCEConfig, progress: Progress | None) -> ErasureResult:
    """Solve UCE's closed form for every attn2.to_k/to_v matrix (SD3/FLUX.1: context_embedder); the pipeline is not modified."""
    started = time.perf_counter()
    prompts = resolve_prompts(pipe, request, config)
    base_hash = request.base_hash or weights_hash(pipe)
    rows = edit_rows(pipe, prompts.erase, prompts.guides, prompts.retain, config.key_rows)
    original = weights_of(pipe, config.edit_keys)
    edited = uce_edit(original, rows, config.lam, config.erase_scale, prompts.preserve_scale)
    erase_loss, preserve_loss = residuals(edited, original, rows)
    record = {
        "step": 1, "erase_loss": round(erase_loss, 8), "preserve_loss": round(preserve_loss, 8),
        "matrices": len(edited), "guide": prompts.guide, "erase_rows": int(rows.erase_keys.shape[0]),
        "preserve_rows": int(rows.preserve_keys.shape[0]), "preserve_scale": prompts.preserve_scale,
        "relative_change": relative_change(edited, original),
    }
    if progress:
        progress(1, 1, record)
    return result(pipe, "uce", prompts, request, edited, config, base_hash, [record], started)
