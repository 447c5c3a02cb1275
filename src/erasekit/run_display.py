"""What `erasekit erase` tells its user before and while it trains: the work it will do and the expected time."""

from __future__ import annotations

from typing import Any

from rich.console import Console


def plan_line(method: str, cfg: Any) -> str:
    """One line naming the work a run will do: model steps and DDIM rollouts."""
    steps = getattr(cfg, "iterations", 0)
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
