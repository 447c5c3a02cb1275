"""What the commands tell their user while they work: the plan of a run, its expected time, and progress.

Progress is a rich bar on a terminal (one line per task, sized for 80 columns) and, in a log file or a pipe,
one plain line every ~1/20 of a task: a log of a long run stays tens of lines long and readable.
"""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, GetTimeCallable, MofNCompleteColumn, Progress, ProgressColumn, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column

LINES_PER_TASK = 20  # a task's plain lines in a log: one per 1/20 of its total (tens of lines, never thousands)
UNKNOWN_TOTAL_EVERY_S = 30.0  # a task of unknown length: at most one plain line per this many seconds
LABEL_WIDTH, BAR_WIDTH = 18, 12
FIXED_WIDTH = LABEL_WIDTH + BAR_WIDTH + len("10000/10000") + 2 * len("0:00:00") + 6  # the columns before the text fields, with their gaps


def _columns(width: int, fields: tuple[str, ...]) -> tuple[ProgressColumn, ...]:
    """Label, bar, n/N, elapsed, left, then ``fields``: cut with '…' so that the whole stays on one line of ``width``."""
    room = max(8, (width - FIXED_WIDTH - 1) // max(1, len(fields)))
    return (
        TextColumn("{task.description}", style="bold", markup=False, table_column=Column(max_width=LABEL_WIDTH, no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=BAR_WIDTH),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        *(TextColumn(f"{{task.fields[{name}]}}", markup=False, table_column=Column(max_width=room, no_wrap=True, overflow="ellipsis")) for name in fields),
    )


def progress_bar(console: Console, *fields: str, transient: bool = False) -> Progress:
    """The progress display of every command: a one-line-per-task bar on a terminal, else a :class:`LineProgress`.

    ``fields`` name the tasks' text fields shown after the times (``bar.add_task(..., info="")``).
    """
    columns = _columns(console.width, fields)
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return LineProgress(*columns, console=console)


def _count(value: float) -> str:
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.3g}"


def _clock(seconds: float | None) -> str:
    return str(timedelta(seconds=int(seconds))) if seconds is not None else "-:--:--"


class LineProgress(Progress):
    """A Progress that draws nothing but prints one plain line per ``1/lines`` of a task's total (and at its end).

    For a log file or a pipe: no bar, no cursor movement, no colour; a task whose total is unknown prints at
    most one line every ``every_s`` seconds.
    """

    def __init__(self, *columns: ProgressColumn, console: Console, lines: int = LINES_PER_TASK, every_s: float = UNKNOWN_TOTAL_EVERY_S,
                 get_time: GetTimeCallable | None = None) -> None:
        super().__init__(*columns, console=console, disable=True, get_time=get_time)
        self.lines, self.every_s = lines, every_s
        self._shown: dict[TaskID, tuple[float, float]] = {}  # per task: the last printed slice (or -1 once complete) and when

    def update(self, task_id: TaskID, *, total: float | None = None, completed: float | None = None, advance: float | None = None,
               description: str | None = None, visible: bool | None = None, refresh: bool = False, **fields: Any) -> None:
        """Update the task as rich does, then print a line if it crossed into a new slice of its total."""
        super().update(task_id, total=total, completed=completed, advance=advance, description=description, visible=visible, refresh=refresh, **fields)
        self._maybe_print(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """Advance the task as rich does, then print a line if it crossed into a new slice of its total."""
        super().advance(task_id, advance)
        self._maybe_print(task_id)

    def _maybe_print(self, task_id: TaskID) -> None:
        task = self._tasks[task_id]
        if not task.visible:
            return
        now = self.get_time()
        last, when = self._shown.get(task_id, (0.0, -math.inf))
        if task.total:  # a line each time the task enters a new slice of 1/lines of its total, and one when it completes
            every = max(1, math.ceil(task.total / self.lines))
            part = -1.0 if task.completed >= task.total else float(task.completed // every)
            if last == -1.0 or part == last or 0 <= part < last:
                return
        else:  # unknown length: the first update, then at most one line per every_s
            part = last
            if now - when < self.every_s:
                return
        self._shown[task_id] = (part, now)
        self.console.print(self.line(task_id), markup=False, highlight=False, emoji=False, soft_wrap=True)

    def line(self, task_id: TaskID) -> str:
        """The plain line of a task: what, how far, how long so far and to go, and its text fields."""
        task = self._tasks[task_id]
        done = f"{_count(task.completed)}/{_count(task.total)} ({task.percentage:.0f}%)" if task.total else _count(task.completed)
        left = f", about {_clock(task.time_remaining)} left" if task.total and task.completed < task.total and task.time_remaining is not None else ""
        extra = "; ".join(str(v) for v in task.fields.values() if str(v).strip())
        return f"{task.description}: {done}, {_clock(task.elapsed)} elapsed{left}" + (f"; {extra}" if extra else "")


def planned_steps(cfg: Any) -> int:
    """The model steps a run of ``cfg`` takes (0 for a closed form); a config may compute them (``total_steps``)."""
    total = getattr(cfg, "total_steps", None)
    return int(total()) if callable(total) else int(getattr(cfg, "iterations", 0))


def plan_line(method: str, cfg: Any) -> str:
    """One line naming the work a run will do: model steps and DDIM rollouts."""
    steps = planned_steps(cfg)
    if not steps:
        return f"{method}: closed form"
    if not hasattr(cfg, "start_guidance"):  # no rollouts (e.g. CA trains on pre-generated anchor images)
        return f"{method}: {steps} training steps"
    reuse = getattr(cfg, "rollout_reuse", 1)
    if getattr(cfg, "faithful", False):
        rollouts, how = 4 * steps, "faithful: 2 iterations per model step, 2 rollouts each"
    else:
        rollouts, how = -(-steps // reuse), f"one batched rollout per {reuse} step(s)"
    return f"{method}: {steps} model steps, {rollouts} rollouts of up to {getattr(cfg, 'ddim_steps', 0)} steps ({how})"


class Estimate:
    """Prints the expected run time once, measured from the first steps."""

    def __init__(self, console: Console, total: int, after: int = 3) -> None:
        import time

        self.console, self.total, self.after, self.clock = console, total, after, time.perf_counter
        self.first: float | None = None
        self.done = False

    def tick(self, step: int) -> None:
        """Call after every step; prints once ``after`` steps past the first."""
        now = self.clock()
        if self.first is None:
            self.first = now
        elif not self.done and step >= 1 + self.after:
            per_step = (now - self.first) / (step - 1)
            self.console.print(f"expected: {per_step:.2f} s/step, about {per_step * self.total:.0f} s for {self.total} steps (from the first {step} steps)")
            self.done = True
