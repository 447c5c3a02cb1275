"""The one life cycle of a fine-tuning run, shared by every method that trains the denoiser.

:class:`Setup` is the state a run prepares once (conditionings of its family, the schedule, the trainable
model, optimiser and RNG); :func:`train` runs a method's loop inside resume, Ctrl-C, checkpoints, the NaN
guard, the delta and the restored model, and builds the :class:`ErasureResult`. Methods bring a loop.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol

import torch
from typing_extensions import TypeVar  # a TypeVar with a default (PEP 696; typing has it from Python 3.13)

from erasekit import distributed as dist
from erasekit.concepts import check_prompt, encode_cond
from erasekit.errors import ErasekitError
from erasekit.families import Cond, Family, Level, Schedule
from erasekit.families.base import Pipeline
from erasekit.methods import checkpoint as ckpt
from erasekit.methods.base import ErasureRequest, Progress, TrainableModel, TrainConfig, make_result, release_after_setup
from erasekit.models import weights_hash
from erasekit.result import ErasureResult


class Draw(Protocol):
    """One draw of the search: its concept's name, and its embedding rebuilt from the current logits."""

    name: str

    def embedding(self) -> Cond:
        """The differentiable adversarial conditioning (one row) of this draw."""


class Search(Protocol):
    """An adversarial search over concepts to preserve (EAP's Gumbel-Softmax, or PGD)."""

    def draw(self, target: int, generator: torch.Generator) -> Draw:
        """Draw the adversarial concept for ``target`` (one hard sample)."""

    def ascend(self, target: int) -> None:
        """Apply the accumulated gradient as a maximisation step and clear it."""

    def leader(self, target: int) -> str:
        """The concept the search currently finds most sensitive."""

    def summary(self) -> dict[str, Any]:
        """Final state (for the history file)."""


ToX0 = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Trainable(Protocol):
    """What the life cycle reads of a trainable model: the denoiser's (:class:`TrainableModel`) or a text encoder's."""

    family: Family
    params: dict[str, torch.nn.Parameter]

    @property
    def device(self) -> torch.device:
        """Where the latents live."""

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The trained model's output."""

    def frozen_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The base model's output, a constant."""

    def delta(self) -> tuple[dict[str, torch.Tensor], str]:
        """The changed tensors and their kind."""

    def restore(self) -> None:
        """Put the pipeline back as it was."""


class RunConfig(Protocol):
    """The settings the life cycle itself reads: :class:`TrainConfig`'s, or a method's own (CA's) that has these."""

    seed: int
    iterations: int
    batch_size: int
    precision: str


C = TypeVar("C", bound=RunConfig, default=TrainConfig)


@dataclass
class Setup(Generic[C]):
    """Everything a loop needs, prepared once: embeddings, schedules, the trainable model."""

    pipe: Pipeline
    config: C
    targets: list[str]
    preserve: list[str]
    emb_null: Cond
    emb_targets: Cond
    emb_preserve: Cond | None
    family: Family
    schedule: Schedule
    trainable: Trainable
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    base_hash: str
    started: float
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: ckpt.CheckpointSpec | None = None
    done: int = 0  # completed model steps
    saved: int = 0  # model steps in the newest checkpoint
    interrupted: bool = False  # Ctrl-C arrived: stop (and checkpoint) at the next step boundary
    between_steps: bool = True  # no step is under way: the state (RNG included) is exactly that of ``done`` steps
    rank: int = 0  # this process under `accelerate launch` (0 alone)
    world: int = 1  # processes sharing each step's batch of rollout points

    def end_step(self, done: int, record: dict[str, Any], erase: torch.Tensor, preserve: torch.Tensor, search: Any,
                 progress: Any, boundary: bool = True) -> None:
        """A finished step: count it, keep and show its record, then :meth:`after_step` (NaN guard, checkpoint)."""
        self.done = done
        self.between_steps = True
        self.history.append(record)
        if progress:
            progress(done, self.config.iterations, record)
        self.after_step(erase, preserve, search, boundary)

    def after_step(self, erase: torch.Tensor, preserve: torch.Tensor, search: Any, boundary: bool) -> None:
        """Guard against NaN/inf and checkpoint at round boundaries every ``checkpoint.every`` steps."""
        if not (torch.isfinite(erase) and torch.isfinite(preserve)):
            where = f"; the last good checkpoint (step {self.saved}) is kept in {self.checkpoint.folder}" if self.checkpoint and self.saved else ""
            raise ErasekitError(f"the loss became {erase.item():.3g}/{preserve.item():.3g} (erase/preserve) at step {self.done}{where}; lower --lr and run again")
        if self.interrupted and boundary:  # a whole step is done and nothing of the next one is drawn yet
            if self.checkpoint is not None and self.done > self.saved:
                self.save(search)
            raise KeyboardInterrupt
        spec = self.checkpoint
        if spec and spec.every and boundary and self.done % spec.every == 0 and self.done < self.config.iterations:
            self.save(search)

    def save(self, search: Any) -> None:
        """Write a checkpoint of the completed steps (the main process writes; every process knows it exists)."""
        if self.checkpoint is not None:
            ckpt.save(self.checkpoint, self.done, self, search)
            self.saved = self.done

    @property
    def uncond(self) -> Cond | None:
        """The rollout's unconditional branch (None for guidance-distilled families, which take no CFG)."""
        return self.emb_null if self.family.uses_cfg else None

    def conditions(self, j: int, draw: Draw | None, step: int) -> list[Cond]:
        """Rollout conditions: [c_e] + [hard adversarial c_a] + [the explicit preserve concept of this step]."""
        conds = [self.emb_targets[j]]
        if draw is not None:
            conds.append(draw.embedding().detach())
        if self.emb_preserve is not None:
            p = step % len(self.preserve)
            conds.append(self.emb_preserve[p])
        return conds

    def draw_levels(self, points: int) -> tuple[list[Level], torch.Tensor]:
        """``points`` rollout points (k, queried t, grid level) along one trajectory, and its start noise."""
        levels = [self.schedule.draw(self.generator) for _ in range(points)]
        return levels, self.family.start_noise(self.pipe, self.generator).to(self.trainable.device)

    def to_x0(self, level: Level) -> ToX0:
        """The x0 map at ``level``'s grid point (DDIM: the reference's ``ddim_alphas[k]``)."""
        return lambda x, out: self.schedule.to_x0(x, out, level)


def prepare(pipe: Pipeline, request: ErasureRequest, config: TrainConfig, separate_copy: bool = False, lora_targets: list[str] | None = None) -> Setup:
    """Validate the request and build the shared state of a run (under `accelerate launch`: this process's rank and the world size).

    ``lora_targets``: the modules a ``lora`` train set adapts (default: the family's attention projections).
    """
    started = time.perf_counter()
    dist.check_precision(config.precision)
    rank, world, _ = dist.distributed(cpu=pipe.device.type == "cpu")
    targets = [check_prompt(pipe, t, "concept") for t in request.targets]
    preserve = [check_prompt(pipe, p, "preserve concept") for p in request.preserve]
    base_hash = request.base_hash or weights_hash(pipe)
    trainable = TrainableModel(pipe, config.train_method, config.lora_rank, separate_copy=separate_copy, lora_targets=lora_targets)
    family = trainable.family
    return Setup(
        pipe=pipe, config=config, targets=targets, preserve=preserve,
        emb_null=family.uncond(pipe), emb_targets=encode_cond(pipe, targets),
        emb_preserve=encode_cond(pipe, preserve) if preserve else None,
        family=family, schedule=family.schedule(pipe, config.ddim_steps),
        trainable=trainable, optimizer=torch.optim.Adam(list(trainable.params.values()), lr=config.lr),
        generator=torch.Generator().manual_seed(config.seed), base_hash=base_hash, started=started, rank=rank, world=world,
    )


def ctrl_c_notice(s: Setup[Any], period: int) -> str:
    """What the first Ctrl-C prints at once: the step at whose boundary the run stops (and checkpoints), as ``after_step`` decides."""
    period = max(1, period)
    if s.between_steps and s.done % period == 0 and s.done > s.saved:
        step = s.done  # a step has just ended (its report is under way): its after_step stops the run
    else:
        step = min(s.config.iterations, (s.done // period + 1) * period)
    return f"finishing step {step} {'to save a checkpoint' if s.checkpoint is not None else 'before stopping'}; Ctrl-C again to stop now"


def _tell(text: str) -> None:
    """Print from a signal handler; a stream that cannot take the line now (a reentrant write) must not stop the run."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, RuntimeError, ValueError):
        pass


def _defer_ctrl_c(s: Setup[Any], period: int = 1) -> Callable[[], None]:
    """Make the first Ctrl-C finish the current step and checkpoint at its boundary (a second one stops at once).

    A checkpoint taken mid-step would hold a random-number state already advanced by that step, so the resumed
    run would differ from an uninterrupted one. Returns a function that puts the previous handler back.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)
    fallback = previous if previous is not None else signal.default_int_handler

    def first(signum: int, frame: Any) -> None:
        s.interrupted = True
        signal.signal(signal.SIGINT, fallback)
        if s.rank == 0:  # acknowledged at once, by one process
            _tell(ctrl_c_notice(s, period))

    signal.signal(signal.SIGINT, first)

    def restore() -> None:
        signal.signal(signal.SIGINT, fallback)

    return restore


Loop = Callable[[Setup[C], Progress | None], None]


def train(s: Setup[C], request: ErasureRequest, method: str, loop: Loop[C], search: Any, period: int, progress: Progress | None) -> ErasureResult:
    """The one life cycle of every fine-tuning run: resume, Ctrl-C, checkpoints, the delta, the restored model, the result.

    ``loop`` runs the model steps from ``s.done`` and calls ``s.after_step`` after each; a checkpoint is exact at
    steps that are multiples of ``period`` (where no rollout is shared with the next step). ``search`` (anything with
    ``state``/``load_state``/``summary``) is checkpointed with the weights.
    """
    release_after_setup(s.pipe, request)  # every embedding (targets, candidates, preserve) exists by now
    if s.config.batch_size < s.world:
        raise ErasekitError(f"batch_size {s.config.batch_size} is smaller than the {s.world} processes; pass --batch-size {s.world} (or a multiple) so every process has rollouts")
    if request.checkpoint is not None:
        s.checkpoint = request.checkpoint
        s.done = s.saved = ckpt.load(request.checkpoint, s, search)
    setup_s = time.perf_counter() - s.started
    try:
        restore = _defer_ctrl_c(s, period)
        try:
            loop(s, progress)
        except KeyboardInterrupt:
            # a Ctrl-C already checkpointed at a boundary; an interrupt between steps (from a progress callback) can still be
            # saved exactly; one in the middle of a step (a second Ctrl-C) keeps the last checkpoint
            if s.checkpoint is not None and s.between_steps and s.done % period == 0 and s.done > s.saved:
                s.save(search)
            where = f"a checkpoint of step {s.saved} is in {s.checkpoint.folder}" if s.checkpoint and s.saved else "no checkpoint was written"
            raise ErasekitError(f"interrupted after step {s.done}; {where}") from None
        finally:
            restore()
        delta, kind = s.trainable.delta()
    finally:
        s.trainable.restore()
    history = list(s.history) + ([{"search": search.summary()}] if search else [])
    return make_result(
        s.pipe, dataclasses.replace(request, base_hash=s.base_hash), method, s.config, delta, kind, history,
        {"setup_s": round(setup_s, 3), "total_s": round(time.perf_counter() - s.started, 3)}, tuple(s.targets), tuple(s.preserve),
    )
