"""All-but-One: the loss is the guidance term's surgery plus the unconditional drift, on the right rows, and bad input is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

import erasekit
import erasekit.methods.all_but_one as abo
from conftest import tiny_pipeline
from erasekit.cli import app
from erasekit.errors import ErasekitError


def test_guidance_losses_match_their_closed_form() -> None:
    # pred = [eps(x,0), eps(x,c)], frozen = [eps0(x,0), eps0(x,c_into)], one element each
    pred = torch.tensor([[1.0], [4.0]])
    frozen = torch.tensor([[0.5], [1.5]])
    guidance, drift = abo.guidance_losses(pred, frozen)
    assert guidance.item() == pytest.approx(((4.0 - 1.0) - (1.5 - 0.5)) ** 2)  # 4
    assert drift.item() == pytest.approx((1.0 - 0.5) ** 2)


def _first_call(monkeypatch: pytest.MonkeyPatch, **settings: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real = abo.guidance_losses

    def capture(pred: torch.Tensor, frozen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append((pred.detach().clone(), frozen.detach().clone()))
        return real(pred, frozen)

    monkeypatch.setattr(abo, "guidance_losses", capture)
    result = erasekit.erase(tiny_pipeline(), "circle", method="all-but-one", iterations=2, ddim_steps=3, lr=1e-3, **settings)
    return seen[0][0], seen[0][1], result


def test_the_default_target_is_no_guidance_and_the_first_step_has_no_drift(monkeypatch: pytest.MonkeyPatch) -> None:
    pred, frozen, result = _first_call(monkeypatch)
    assert torch.equal(frozen[1], frozen[0])  # into = '' : the frozen model's guidance term for the empty prompt is 0
    assert torch.equal(pred[0], frozen[0])  # before the first step theta = theta0: the unconditional rows agree exactly
    assert not torch.equal(pred[1], pred[0])  # the target's own guidance term is what is trained away
    assert result.history[0]["preserve_loss"] == 0.0 and result.history[0]["erase_loss"] > 0
    assert result.method == "all-but-one" and result.delta


def test_into_moves_the_target_onto_the_chosen_concepts_guidance(monkeypatch: pytest.MonkeyPatch) -> None:
    pred, frozen, _ = _first_call(monkeypatch, into="square")
    assert not torch.equal(frozen[1], frozen[0])  # the frozen model's guidance toward 'square'
    assert not torch.equal(frozen[1], pred[1])  # ... not the target's own prediction
    assert torch.equal(pred[0], frozen[0])


def test_into_the_concept_itself_is_refused() -> None:
    with pytest.raises(ErasekitError, match="into .*'Circle' is the concept being erased"):
        erasekit.erase(tiny_pipeline(), "circle", method="all-but-one", into="Circle", iterations=1)
    with pytest.raises(ErasekitError, match="takes no --preserve"):
        erasekit.erase(tiny_pipeline(), "circle", method="all-but-one", preserve=["ring"], iterations=1)


def test_cli_into_the_concept_itself_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["erase", "-c", "circle", "--method", "all-but-one", "--into", "circle", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "is the concept being erased" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
