"""Data parallelism under `accelerate launch`: rank and world size, barriers, all-reduce and gather with a timeout.

Outside `accelerate launch` (or with one process) every helper is a no-op that touches neither accelerate nor
torch.distributed, so the single-process path costs nothing. Collectives time out after
``$ERASEKIT_COLLECTIVE_TIMEOUT`` seconds (default 1800), so a process that dies or hangs makes the others stop
with a one-line error instead of waiting forever.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from erasekit.errors import ErasekitError

TIMEOUT_ENV = "ERASEKIT_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0
BUCKET_BYTES = 32 * 2**20  # gradients are all-reduced in flat buckets of about this size (as DDP does)
PRECISIONS = ("fp32", "bf16", "fp16")


def collective_timeout() -> float:
    """Seconds a collective may wait for the other processes: ``$ERASEKIT_COLLECTIVE_TIMEOUT``, else 1800."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < 10**7:
        raise ErasekitError(f"{TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def launched_world() -> int:
    """The number of processes `accelerate launch` / torchrun started (1 outside them)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _state(cpu: bool) -> Any:
    from accelerate import PartialState

    # cpu: join over gloo (MULTI_CPU) rather than look for accelerators; the timeout reaches init_process_group
    state = PartialState(cpu=cpu, timeout=timedelta(seconds=collective_timeout()))
    if state.num_processes != launched_world():
        raise ErasekitError(f"{launched_world()} processes were launched but accelerate joined {state.num_processes}; "
                            "on CPU pass --device cpu, on GPUs --device cuda")
    return state


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Turn a failed or timed-out collective into a one-line error naming the likely cause."""
    try:
        yield
    except (RuntimeError, torch.distributed.DistError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ErasekitError(f"{what} failed on process {os.environ.get('RANK', '0')}: another process died or stopped "
                            f"responding ({first}); see its log. Raise {TIMEOUT_ENV} (now {collective_timeout():.0f} s) "
                            "if a step legitimately takes longer") from None


def distributed(cpu: bool = True) -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier) under `accelerate launch` with several processes; (0, 1, no-op) otherwise."""
    if launched_world() <= 1:
        return 0, 1, lambda: None
    state = _state(cpu)

    def barrier() -> None:
        with _guard("waiting for the other processes"):
            torch.distributed.barrier()

    return state.process_index, state.num_processes, barrier


def is_main_process() -> bool:
    """True outside `accelerate launch` and on its global rank 0 (read from the environment; starts nothing)."""
    return os.environ.get("RANK", "0") == "0"


def resolve_device(device: str | None) -> str:
    """The torch device of this process: ``device`` alone; under several processes 'cuda' becomes this process's GPU."""
    from erasekit.checks import check_device

    device = check_device(device or "cpu", available=False)  # whether this machine has it, the load says
    if launched_world() <= 1:
        return device
    kind, _, index = device.partition(":")
    if kind == "cpu":
        return "cpu"
    if index:
        raise ErasekitError(f"--device {device} names one device, but {launched_world()} processes were launched; "
                            f"pass --device {kind} and each process takes its own (LOCAL_RANK)")
    return f"{kind}:{int(os.environ.get('LOCAL_RANK', '0'))}"


def shard(n: int, rank: int, world: int) -> range:
    """Rows [start, stop) of ``n`` that process ``rank`` of ``world`` takes: contiguous blocks, sizes differing by at most one."""
    return range(rank * n // world, (rank + 1) * n // world)


def gather_rows(part: Mapping[str, np.ndarray], n: int, rank: int, world: int, device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """Concatenate every process's :func:`shard` of per-row arrays (same keys everywhere) into the full ``n`` rows, on every process."""
    if world <= 1:
        return dict(part)
    sizes = [len(shard(n, r, world)) for r in range(world)]
    widest = max(sizes)
    out = {}
    for key in sorted(part):  # the same order on every process
        local = np.asarray(part[key])
        if local.dtype == object or local.dtype.kind in "USV":
            raise ErasekitError(f"score {key!r} is not numeric; a scorer must return numeric arrays to run on several processes")
        tensor = torch.from_numpy(np.ascontiguousarray(local.astype(np.float64) if local.dtype == np.float16 else local))
        padded = torch.zeros((widest, *tensor.shape[1:]), dtype=tensor.dtype)
        padded[: len(tensor)] = tensor
        padded = padded.to(device)
        pieces = [torch.empty_like(padded) for _ in range(world)]
        with _guard(f"gathering score {key!r}"):
            torch.distributed.all_gather(pieces, padded)
        full = torch.cat([p[:size] for p, size in zip(pieces, sizes)]).cpu().numpy()
        out[key] = full.astype(local.dtype, copy=False)
    return out


def all_reduce_grads(tensors: Sequence[torch.Tensor], extra: torch.Tensor) -> torch.Tensor:
    """Sum the gradients of ``tensors`` and the small vector ``extra`` over every process; returns the summed ``extra``.

    A tensor whose gradient is None on every process keeps None (an optimiser then skips it, as on one process);
    one that has a gradient somewhere gets the sum, zeros standing in where a process had none.
    """
    head = torch.cat([torch.tensor([float(t.grad is not None) for t in tensors], dtype=torch.float64), extra.detach().double().cpu()])
    device = tensors[0].device if tensors else torch.device("cpu")
    head = head.to(device)
    with _guard("all-reducing the gradients"):
        torch.distributed.all_reduce(head)
        present = [t for t, flag in zip(tensors, head[: len(tensors)].tolist()) if flag > 0]
        for t in present:
            if t.grad is None:
                t.grad = torch.zeros_like(t)
        for bucket in _buckets([t.grad for t in present if t.grad is not None]):  # every one has a gradient by now
            flat = torch.cat([g.reshape(-1) for g in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1).clone()
            torch.distributed.all_reduce(flat)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
    return head[len(tensors) :].to(extra.dtype).cpu()


def _buckets(grads: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        if bucket and (size + g.numel() * g.element_size() > BUCKET_BYTES or g.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(g)
        size += g.numel() * g.element_size()
    if bucket:
        yield bucket


def check_precision(precision: str) -> str:
    """Refuse an unknown precision, or one that contradicts `accelerate launch --mixed_precision`."""
    if precision not in PRECISIONS:
        raise ErasekitError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    wanted = {"fp32": "no"}.get(precision, precision)
    if launched not in ("no", "", wanted):
        raise ErasekitError(f"accelerate launch --mixed_precision {launched} but erasekit --precision {precision}; "
                            f"pass --precision {launched} to erasekit (it is recorded with the delta)")
    return precision


def autocast(precision: str, device: torch.device) -> Any:
    """The autocast context of a precision (what accelerate's mixed_precision does); fp32: none at all."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
