"""RECE (Gong et al., ECCV 2024): UCE, then rounds that find the embedding still regenerating the concept and erase it too.

Each round derives c' = (reg I + sum_l W'_lᵀW'_l)⁻¹ (sum_l W'_lᵀW0_l) c over every edited matrix (W' current,
W0 original; to_k/to_v on SD/SDXL, context_embedder on SD3/FLUX.1) for every row of the concept's ``hidden``
states, then UCE-erases c' on the *current* weights, so edits accumulate (DESIGN.md §3b; reference:
train_object.py, close_form_emb_regzero, edit_model_adversarial).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from erasekit.errors import ErasekitError
from erasekit.families import family_of
from erasekit.families.base import Pipeline
from erasekit.methods.base import ErasureRequest, Progress
from erasekit.methods.closed_form import EditRows, applied, derive_embedding, edit_rows, encoder_rows, relative_change, residuals, uce_edit, weights_of
from erasekit.methods.uce import UCEConfig, resolve_prompts, result
from erasekit.models import weights_hash
from erasekit.result import ErasureResult

RoundSelector = Callable[[Pipeline, int], float]
MAX_ROUNDS = 20  # each round keeps a float64 copy of every edited matrix (about 0.15 GB on SD 1.x) until the best is chosen


@dataclass
class RECEConfig(UCEConfig):
    """RECE settings; defaults are the reference's for objects and art (train_object.py / train_uce.py)."""

    lam: float = field(default=0.1, metadata={"help": "lambda of every round's edit (RECE: 0.1)."})
    preserve_scale: float = field(default=0.1, metadata={"help": "s_p of every round (RECE: 0.1); negative = max(0.1, 1/|retain|)."})
    start_lam: float = field(default=0.5, metadata={"help": "lambda of the starting UCE edit: RECE's scripts load a UCE checkpoint made with UCE's own defaults (0.5)."})
    start_preserve_scale: float = field(default=1.0, metadata={"help": "s_p of the starting UCE edit (UCE's default 1.0; 0.1 for art, as the 'art' preset sets); negative = max(0.1, 1/|retain|)."})
    key_rows: str = field(default="through-eos", metadata={"help": "Key rows of the starting UCE edit (RECE starts from the old UCE code: through-eos); rounds always use every row of hidden (77 on SD/SDXL)."})
    retain_empty: bool = field(default=True, metadata={"help": "Preserve '' in the UCE start (old UCE code: yes); rounds always retain '' as the reference does."})
    reg_scale: float = field(default=1e-3, metadata={"help": "Regulariser of c' (RECE: 1e-3 for art and hard objects, 0.1 for nudity)."})
    rounds: int = field(default=1, metadata={"help": "Rounds after the UCE start (RECE: 1 for art and hard objects, 3 for nudity)."})
    round_selector: RoundSelector | None = field(default=None, metadata={"help": "Library only: f(pipe, round) -> score (lower = better erased), called with each round's weights applied; the lowest wins (the reference's validation detector). None = the last round."})

    def validate(self) -> None:
        """Check the round settings too."""
        super().validate()
        from erasekit.checks import MAX_SCALE, MIN_REGULARISER, check_between, check_scale

        check_between("start_lam", self.start_lam, MIN_REGULARISER, MAX_SCALE, why="it keeps the solve well posed; UCE uses 0.5")
        check_scale("start_preserve_scale", self.start_preserve_scale)
        check_between("rounds", self.rounds, 1, MAX_ROUNDS, why="RECE uses 1 .. 3; every round's weights are kept until one is chosen")
        check_between("reg_scale", self.reg_scale, MIN_REGULARISER, MAX_SCALE, why="it keeps c' well posed; RECE uses 1e-3 .. 0.1")
        if self.round_selector is not None and not callable(self.round_selector):
            raise ErasekitError("round_selector must be a function f(pipe, round) -> score")


def rece_round(
    current: dict[str, torch.Tensor], original: dict[str, torch.Tensor], concepts: torch.Tensor, guide: torch.Tensor,
    retained: torch.Tensor, config: RECEConfig, preserve_scale: float,
) -> tuple[dict[str, torch.Tensor], EditRows]:
    """One round: c' for each concept (N x rows x d), then UCE maps every row of c' to the guide's row on the current weights."""
    adversarial = torch.stack([derive_embedding(current, original, c, config.reg_scale).cpu() for c in concepts])
    rows = EditRows(adversarial.flatten(0, 1), guide.expand(len(concepts), -1, -1).flatten(0, 1), retained)
    return uce_edit(current, rows, config.lam, config.erase_scale, preserve_scale), rows


def rece_start(original: dict[str, torch.Tensor], rows: EditRows, config: RECEConfig, n_retain: int) -> dict[str, torch.Tensor]:
    """The UCE edit RECE starts from, made with UCE's settings (``start_lam``, ``start_preserve_scale``), not the rounds'."""
    scale = config.start_preserve_scale if config.start_preserve_scale >= 0 else max(0.1, 1 / max(n_retain, 1))
    return uce_edit(original, rows, config.start_lam, config.erase_scale, scale)


def _select(pipe: Pipeline, snapshots: list[dict[str, torch.Tensor]], selector: RoundSelector | None) -> tuple[int, list[float]]:
    """The chosen round (1-based) and every round's score."""
    if selector is None:
        return len(snapshots), []
    scores: list[float] = []
    model = family_of(pipe).denoiser(pipe)
    for r, weights in enumerate(snapshots, start=1):
        previous = applied(model, weights)
        try:
            scores.append(float(selector(pipe, r)))
        finally:
            applied(model, previous)
    return 1 + min(range(len(scores)), key=lambda i: scores[i]), scores


def fit_rece(pipe: Pipeline, request: ErasureRequest, config: RECEConfig, progress: Progress | None) -> ErasureResult:
    """UCE start, then ``rounds`` accumulating RECE rounds; the pipeline is left unchanged."""
    started = time.perf_counter()
    prompts = resolve_prompts(pipe, request, config)
    base_hash = request.base_hash or weights_hash(pipe)
    original = weights_of(pipe, config.edit_keys)
    start_rows = edit_rows(pipe, prompts.erase, prompts.guides, prompts.retain, config.key_rows)
    current = rece_start(original, start_rows, config, len(prompts.retain))
    concepts = encoder_rows(pipe, prompts.targets)
    guide = encoder_rows(pipe, [prompts.guide])[0]
    # the reference's rounds retain '' plus the preserve list, every one of their rows (77 on SD/SDXL)
    retain = list(dict.fromkeys(["", *prompts.retain]))
    retained = encoder_rows(pipe, retain).flatten(0, 1)
    history: list[dict[str, Any]] = [{"round": 0, "stage": "uce", "relative_change": relative_change(current, original)}]
    snapshots = []
    for r in range(1, config.rounds + 1):
        previous = current
        current, rows = rece_round(previous, original, concepts, guide, retained, config, prompts.preserve_scale)
        snapshots.append(current)
        shift = float((rows.erase_keys.view_as(concepts) - concepts).norm() / concepts.norm())
        erase_loss, preserve_loss = residuals(current, previous, rows)
        record = {
            "step": r, "round": r, "stage": "rece", "erase_loss": round(erase_loss, 8), "preserve_loss": round(preserve_loss, 8),
            "embedding_shift": round(shift, 6), "relative_change": relative_change(current, original),
        }
        history.append(record)
        if progress:
            progress(r, config.rounds, record)
    chosen, scores = _select(pipe, snapshots, config.round_selector)
    history.append({"chosen_round": chosen, "scores": [round(s, 6) for s in scores]})
    return result(pipe, "rece", prompts, request, snapshots[chosen - 1], config, base_hash, history, started)
