"""The rollout convention every fine-tuning method shares (DESIGN.md §3 step 3), pinned with a closed-form case.

With data that is all zeros, the exact noise model is eps(x, t) = x / sqrt(1 - ᾱ_t), DDIM predicts x0 = 0 at
every step, and the state after any number of steps is z * sqrt(1 - ᾱ_level) / sqrt(1 - ᾱ_start): its norm
tells the noise level it sits at. The UNet must be queried at a timestep of that same level, and the x0 map
must use ᾱ of that level.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import erasekit
import erasekit.methods.age as age
import erasekit.methods.all_but_one as all_but_one
import erasekit.methods.loop as loop
from conftest import tiny_pipeline
from erasekit.families import Cond
from erasekit.families.schedules import DDIMSchedule
from erasekit.methods.base import TrainableUNet

S = 10  # DDIM steps of the rollouts here: bins of T/S = 100 timesteps


def _alphas() -> torch.Tensor:
    return tiny_pipeline().scheduler.alphas_cumprod.double()


def _exact_eps(alphas: torch.Tensor):  # type: ignore[no-untyped-def]
    """The exact noise prediction for all-zero data, as a function of the timestep it is asked about."""

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = alphas[t.long().cpu()].to(x.dtype).view(-1, *[1] * (x.dim() - 1))
        return x / (1 - a).sqrt()

    return eps


def _timestep_of(alpha_bar: float, alphas: torch.Tensor) -> int:
    """The DDPM timestep whose ᾱ is nearest ``alpha_bar``."""
    return int(torch.argmin((alphas - alpha_bar).abs()))


class Recorder:
    """Replaces the trainable UNet's eps by the exact zero-data model and records what the methods hand it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.alphas = _alphas()
        self.events: list[tuple[str, Any, Any]] = []
        exact = _exact_eps(self.alphas)
        events = self.events

        def eps(unet_self: TrainableUNet, x: torch.Tensor, t: torch.Tensor, emb: object) -> torch.Tensor:
            if torch.is_grad_enabled():  # a query the loss is taken on (rollouts run under no_grad)
                events.append(("query", x.detach().clone(), t.detach().clone()))
                anchor = next(iter(unet_self.params.values()))  # keeps a graph for backward; adds exactly 0
                return exact(x, t) + 0.0 * anchor.sum()
            events.append(("roll", x.detach().clone(), t.detach().clone()))
            return exact(x, t)

        def capture(real):  # type: ignore[no-untyped-def]
            def losses(pred, frozen, x, to_x0, eta, space):  # type: ignore[no-untyped-def]
                # the x0 map's ᾱ: x0 = (x - sqrt(1 - a) eps) / sqrt(a), so x = 1, eps = 0 gives 1 / sqrt(a)
                alpha_bar = float(1.0 / to_x0(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)) ** 2)
                events.append(("loss", x.detach().clone(), alpha_bar))
                return real(pred, frozen, x, to_x0, eta, space)

            return losses

        monkeypatch.setattr(TrainableUNet, "eps", eps)
        monkeypatch.setattr(loop, "erasure_losses", capture(loop.erasure_losses))
        monkeypatch.setattr(age, "erasure_losses", capture(age.erasure_losses))

        def guidance(real):  # type: ignore[no-untyped-def]
            def losses(pred, frozen):  # type: ignore[no-untyped-def]
                queried = next(x for kind, x, _ in reversed(events) if kind == "query")
                events.append(("loss", queried, None))  # no x0 map: All-but-One's loss is on eps
                return real(pred, frozen)

            return losses

        monkeypatch.setattr(all_but_one, "guidance_losses", guidance(all_but_one.guidance_losses))

    def levels(self, start_t: int) -> list[tuple[float, int, float | None]]:
        """(implied ᾱ, queried timestep or -1, ᾱ of the x0 map or None): one entry per queried row, one per loss."""
        start_alpha = float(self.alphas[start_t])
        out: list[tuple[float, int, float | None]] = []
        z: torch.Tensor | None = None
        base: torch.Tensor | None = None

        def implied(row: torch.Tensor) -> float:
            assert base is not None
            return 1 - float(row.double().norm() / base.double().norm()) ** 2 * (1 - start_alpha)

        for kind, x, extra in self.events:  # an iteration: rollout calls, queries, then its loss
            if kind == "roll":
                if z is None:  # the iteration's first rollout call sees the start noise
                    z = x[0]
            elif kind == "query":
                base = z if z is not None else x[0]  # no rollout call: x_t is the start noise itself
                out += [(implied(row), int(t), None) for row, t in zip(x, extra)]
            else:  # the loss of the rows just queried: its x0 map belongs to the first row's latent
                out.append((implied(x[0]), -1, extra))
                z = None
        return out


CASES = {
    "eap": {"method": "eap", "k": 8, "n_centres": 3},
    "eap-faithful": {"method": "eap", "k": 8, "n_centres": 3, "faithful": True},
    "esd-x": {"method": "esd-x"},
    "age": {"method": "age", "k": 8, "n_centres": 3, "rollout_reuse": 1},
    "all-but-one": {"method": "all-but-one"},
}
X0_CASES = sorted(c for c in CASES if c != "all-but-one")  # All-but-One takes its loss on eps: no x0 map


def _erase_recorded(case: str, iterations: int, words_file: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int, float | None]]:
    """Run ``case`` on the exact zero-data noise model and return what its UNet queries and x0 maps saw."""
    recorder = Recorder(monkeypatch)
    settings = dict(CASES[case])
    if "k" in settings:
        settings["concept_space"] = str(words_file)
    erasekit.erase(tiny_pipeline(), "circle", iterations=iterations, ddim_steps=S, lr=1e-3, **settings)
    return recorder.levels(DDIMSchedule(tiny_pipeline().scheduler.config, S).grid[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_latent_handed_to_the_unet_is_at_the_noise_level_of_its_timestep(case: str, words_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    alphas = _alphas()
    width = 1000 // S
    bins = set()
    for implied, t, _ in _erase_recorded(case, 40, words_file, monkeypatch):
        if t < 0:
            continue
        level_t = _timestep_of(implied, alphas)
        assert abs(level_t - t) < width, f"queried at t={t} with a latent at the noise level of t={level_t}"
        bins.add(t // width)
    assert bins == set(range(S)), f"only bins {sorted(bins)} were drawn"  # every k of the grid was checked


@pytest.mark.parametrize("case", X0_CASES)
def test_the_x0_map_uses_the_alpha_bar_of_the_latent_not_of_the_drawn_timestep(case: str, words_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = 0
    for implied, t, alpha in _erase_recorded(case, 20, words_file, monkeypatch):
        if t < 0 and alpha is not None:
            assert alpha == pytest.approx(implied, rel=1e-4, abs=1e-6)
            checked += 1
    assert checked >= 20


def test_each_bin_of_the_grid_is_reached_by_its_own_number_of_steps() -> None:
    pipe = tiny_pipeline()
    alphas = pipe.scheduler.alphas_cumprod.double()
    empty = Cond({"hidden": torch.zeros(1, 77, 16)})
    for steps in (3, S, 25, 50):
        schedule = DDIMSchedule(pipe.scheduler.config, steps)
        width = 1000 / steps
        start = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        eps = _exact_eps(alphas)
        for k in range(steps):
            level = schedule.level(k)
            n, grid_t = level.steps, int(level.grid_t)
            assert k * width <= grid_t < (k + 1) * width
            x = schedule.rollout(lambda x, t, emb, eps=eps: eps(x, t), start, empty, empty, [n], 3.0)[0]
            ratio = float(x.double().norm() / start.double().norm())
            implied = 1 - ratio**2 * (1 - float(alphas[schedule.grid[0]]))
            assert implied == pytest.approx(float(alphas[grid_t]), rel=1e-4)
