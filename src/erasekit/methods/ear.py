"""EAR (Fan et al. 2025, "EAR: Erasing Concepts from Unified Autoregressive Models"): ESD carried to image-token logits.

Each iteration the *trained* model draws one image for a target prompt (Janus's CFG sampler, no gradient); on its
image-token positions the frozen model gives the concept logits ``c0`` (target prompt) and the neutral logits ``n0``
(Janus's unconditional branch: the prompt with every token but BOS and begin-of-image replaced by pad). The trained
model's prediction under the target prompt is pushed toward the negatively guided ``n0 - eta * (c0 - n0)``.

* **Loss space.** Default ``logprob``: per position, the mean over the codebook of the squared difference of
  log-softmaxes. Logits are defined only up to a constant per position (the softmax ignores it), so an MSE on raw
  logits spends gradient moving that constant, which changes nothing the sampler draws; log-softmax fixes it while
  keeping ESD's squared error on the very vector CFG combines (``log_softmax`` of the guided logits is the same
  whether the combination is taken of logits or of log-probabilities). ``logit`` is the raw-logit MSE (ESD literal).
* **Windowed gradient accumulation** (WGA): the N image positions are cut into windows of ``window_size``; each
  window is one forward of the trained model over the prompt and the image up to the window's end, and one backward
  of that window's share of the loss (its positions' losses summed, divided by N), so the accumulated gradient is the
  gradient of the whole mean loss; one optimiser step per iteration. Off: one window of all N positions.
* **Thresholded loss masking** (TLM): positions whose loss is below ``threshold`` contribute nothing (the concept
  does not move them: content to protect); an iteration where every position is masked makes no update at all.
Both off is the paper's ablation: ESD-style erasure on the autoregressive model.

* **LoRA** (``train_method="lora"``): instead of training base matrices in place, a rank-``lora_rank`` PEFT LoRA
  on the language model's attention projections (``q_proj``/``k_proj``/``v_proj``/``o_proj`` of every Llama layer;
  :mod:`erasekit.autoregressive.lora`) trains, the base weights frozen; its init is a function of ``seed`` only. The
  frozen model is the same network with the adapter switched off. The result is a plain ``weights`` delta of the
  adapted matrices with the LoRA *merged* in (``W + B @ A``, keys ``janus.<parameter name>``), so applying, saving
  and loading are those of every Janus delta and a saved delta reloads to bit-identical weights; each matrix's change
  has rank at most ``lora_rank``. The model is handed back without any PEFT layer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from erasekit.autoregressive.delta import FAMILY, PREFIX, janus_weights_hash
from erasekit.autoregressive.janus import (
    TRAIN_SETS,
    ImageLogits,
    Janus,
    Prompts,
    encode_prompts,
    image_logits,
    image_token_count,
    sample_image_tokens,
    train_parameters,
    unconditional,
)
from erasekit.autoregressive.lora import add_janus_lora, lora_disabled, merged_lora_weights, remove_janus_lora
from erasekit.errors import ErasekitError
from erasekit.methods.base import ErasureRequest, MethodConfig, Progress, esd_target
from erasekit.result import ErasureResult

LOSS_SPACES = ("logprob", "logit")


@dataclass
class EARConfig(MethodConfig):
    """EAR's settings; defaults follow the paper (Fan et al. 2025) where it states them."""

    iterations: int = field(default=30, metadata={"help": "Model update steps (EAR: a few dozen)."})
    lr: float = field(default=1e-4, metadata={"help": "Adam learning rate (EAR: 1e-4)."})
    train_method: str = field(default="attn", metadata={"help": "Parameters to train: attn, mlp (the language model's layers), head (the image head), full, "
                                                                "lora (a LoRA on the language model's attention q_proj/k_proj/v_proj/o_proj, merged into them in the delta)."})
    lora_rank: int = field(default=4, metadata={"help": "LoRA rank when train_method is lora."})
    negative_guidance: float = field(default=1.0, metadata={"help": "eta of the target n0 - eta (c0 - n0) on image-token logits (EAR, as ESD: 1)."})
    threshold: float = field(default=0.05, metadata={"help": "Thresholded loss masking: positions whose loss is below it do not train (EAR: 0.05)."})
    window_size: int = field(default=16, metadata={"help": "Image-token positions per window of windowed gradient accumulation (at most the image's token count)."})
    windowed: bool = field(default=True, metadata={"help": "Windowed gradient accumulation (EAR); off: one backward over every position (the ablation)."})
    masking: bool = field(default=True, metadata={"help": "Thresholded loss masking (EAR); off: every position trains (the ablation)."})
    guidance: float = field(default=5.0, metadata={"help": "CFG scale of the images the model draws for itself (Janus-Pro's default: 5)."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of those images (Janus-Pro's default: 1)."})
    loss_space: str = field(default="logprob", metadata={"help": "logprob: MSE of log-softmaxes (shift-free, our default); logit: MSE of raw logits (ESD literal)."})

    def validate(self) -> None:
        """Refuse values that cannot run, with one-line messages."""
        super().validate()
        from erasekit.checks import MAX_GUIDANCE, MAX_ITERATIONS, MAX_LORA_RANK, MAX_LR, check_between

        check_between("iterations", self.iterations, 1, MAX_ITERATIONS)
        check_between("lr", self.lr, 0.0, MAX_LR, low_open=True, why="Adam's step; EAR uses 1e-4")
        check_between("negative_guidance", self.negative_guidance, 0.0, MAX_GUIDANCE, why="ESD's eta; EAR uses 1")
        check_between("threshold", self.threshold, 0.0, 1e6, why="a loss value; EAR uses 0.05")
        check_between("window_size", self.window_size, 1, 1_000_000)
        check_between("guidance", self.guidance, 0.0, MAX_GUIDANCE, why="a CFG scale; Janus-Pro uses 5")
        check_between("temperature", self.temperature, 0.0, 100.0, low_open=True)
        check_between("lora_rank", self.lora_rank, 1, MAX_LORA_RANK)
        if self.train_method not in TRAIN_SETS:
            raise ErasekitError(f"unknown train_method {self.train_method!r} for EAR; choose one of: {', '.join(TRAIN_SETS)}")
        if self.loss_space not in LOSS_SPACES:
            raise ErasekitError(f"unknown loss_space {self.loss_space!r}; choose one of: {', '.join(LOSS_SPACES)}")

    def check_model(self, janus: Any) -> None:
        """Refuse settings the loaded model cannot run (``erase`` calls it before any work)."""
        check_model(self, janus)


def check_model(config: EARConfig, janus: Janus) -> None:
    """Refuse settings the loaded model cannot run, before any work: a window wider than its image's tokens."""
    if config.windowed:
        check_window(config.window_size, image_token_count(janus.model))


def position_losses(pred: torch.Tensor, target: torch.Tensor, space: str) -> torch.Tensor:
    """Per-position loss (B x n) between predicted and target image-token logits (B x n x codebook), mean over the codebook."""
    if space == "logprob":
        pred, target = F.log_softmax(pred.float(), dim=-1), F.log_softmax(target.float(), dim=-1)
    return (pred.float() - target.float()).pow(2).mean(-1)


def windows(count: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) windows of ``size`` positions covering ``count`` (the last may be shorter)."""
    return [(start, min(start + size, count)) for start in range(0, count, size)]


def check_window(window_size: int, count: int) -> None:
    """Refuse a window wider than the image, in one line."""
    if window_size > count:
        raise ErasekitError(f"window_size {window_size} is larger than the image's {count} tokens; pass --window-size {count} or less")


@dataclass
class EARStep:
    """What one iteration's accumulation did: the mean loss over every position, the positions that trained, whether it updated."""

    erase_loss: float
    kept: int
    positions: int

    @property
    def updated(self) -> bool:
        """Whether any position contributed a gradient (else the optimiser step is skipped)."""
        return self.kept > 0


def accumulate(
    model: torch.nn.Module, prompts: Prompts, tokens: torch.Tensor, target: torch.Tensor, config: EARConfig,
) -> EARStep:
    """Backward EAR's loss into the trained parameters' ``.grad``, window by window, masked below the threshold.

    ``target`` (B x N x codebook) is the negatively guided logits on ``tokens`` (B x N). Each window's share is its
    kept positions' losses summed over the batch and divided by B x N: with nothing masked the accumulated gradient
    equals that of the mean loss over every position in one backward.
    """
    n = tokens.shape[1]
    if config.windowed:
        check_window(config.window_size, n)
    spans = windows(n, config.window_size if config.windowed else n)
    total, kept, sum_loss = tokens.numel(), 0, 0.0
    for start, end in spans:
        pred = image_logits(model, prompts, tokens[:, :end])[:, start:end]
        losses = position_losses(pred, target[:, start:end], config.loss_space)
        sum_loss += float(losses.detach().sum())
        keep = losses.detach() >= config.threshold if config.masking else torch.ones_like(losses, dtype=torch.bool)
        if not bool(keep.any()):
            continue  # nothing of this window trains: no backward
        kept += int(keep.sum())
        (losses * keep).sum().div(total).backward()
    return EARStep(sum_loss / total, kept, total)


def frozen_logits(call: ImageLogits, originals: dict[str, torch.Tensor], prompts: Prompts, tokens: torch.Tensor) -> torch.Tensor:
    """Teacher-forced image logits of the frozen base (a constant): any LoRA adapter switched off, the original tensors swapped in.

    With ``lora`` ``originals`` is empty (the base weights never change) and switching the adapter off gives the
    base; with the other sets no adapter exists and the swap gives it.
    """
    with torch.inference_mode(), lora_disabled(call.inner):
        out = functional_call(call, originals, (prompts, tokens), strict=False)
    return out.clone()


def fit_ear(janus: Janus, request: ErasureRequest, config: EARConfig, progress: Progress | None = None) -> ErasureResult:
    """Erase ``request.targets`` from a Janus model with EAR; the model is left as it was, the delta is returned."""
    if not isinstance(janus, Janus):  # a diffusers pipeline has no image-token logits to guide
        raise ErasekitError(f"ear erases from autoregressive (Janus) models; this is a {type(janus).__name__}, use a diffusion method such as esd-x")
    config.validate()
    if not request.targets:
        raise ErasekitError("EAR needs at least one concept to erase")
    model = janus.model
    count = image_token_count(model)
    if config.windowed:
        check_window(config.window_size, count)
    started = time.perf_counter()
    base_hash = request.base_hash or janus_weights_hash(model)
    lora = config.train_method == "lora"
    params: dict[str, torch.nn.Parameter] = {}
    originals: dict[str, torch.Tensor] = {}
    history: list[dict[str, Any]] = []
    model.eval()
    try:
        if lora:  # the adapter trains; the base weights stay frozen and as they were (no originals to keep)
            params = add_janus_lora(model, config.lora_rank, config.seed)
        else:
            params = train_parameters(model, config.train_method)
            originals = {f"inner.{n}": p.detach().clone() for n, p in params.items()}
        call = ImageLogits(model)
        generator = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.Adam(list(params.values()), lr=config.lr)
        for p in params.values():
            p.requires_grad_(True)
        for step in range(config.iterations):
            j = int(torch.randint(len(request.targets), (1,), generator=generator))
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
            prompts = encode_prompts(janus, [request.targets[j]])
            tokens = sample_image_tokens(janus, prompts, [seed], config.guidance, config.temperature).to(janus.device)
            concept = frozen_logits(call, originals, prompts, tokens)
            neutral = frozen_logits(call, originals, unconditional(janus, prompts), tokens)
            target = esd_target(neutral, concept, config.negative_guidance)
            optimizer.zero_grad(set_to_none=True)
            done = accumulate(model, prompts, tokens, target, config)
            if done.updated:
                optimizer.step()
            record = {"step": step + 1, "target": request.targets[j], "erase_loss": round(done.erase_loss, 6),
                      "kept": done.kept, "positions": done.positions, "updated": done.updated}
            history.append(record)
            if progress is not None:
                progress(step + 1, config.iterations, record)
        if lora:  # merged: a plain weights delta of the adapted matrices
            delta = {f"{PREFIX}{n}": w for n, w in merged_lora_weights(model).items()}
        else:
            delta = {f"{PREFIX}{n}": p.detach().clone().contiguous() for n, p in params.items()}
    finally:
        with torch.no_grad():  # the caller's model goes back to its base weights, frozen, without any adapter
            if lora:
                if params:  # only the adapter this run added (a model that came with one was refused untouched)
                    remove_janus_lora(model)
            else:
                for n, p in params.items():
                    p.copy_(originals[f"inner.{n}"])
        model.requires_grad_(False)
    return ErasureResult(
        method="ear", concepts=tuple(request.targets), preserve=tuple(request.preserve), delta=delta, kind="weights",
        config=dataclasses.asdict(config), base_model_id=janus.name_or_path, base_hash=base_hash, history=tuple(history),
        timings={"total_s": round(time.perf_counter() - started, 3)}, family=FAMILY,
    )
