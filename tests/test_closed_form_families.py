"""UCE and RECE on the flow families (SD3, FLUX.1): they edit the transformer's context_embedder in closed form.

The key rows are checked against the tokenizers and text encoders directly (not through the family's own
row method), so a wrong row or a wrong matrix fails here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import erasekit
from erasekit.families import family_of
from erasekit.families.tiny import build_tiny, tiny_pipeline
from erasekit.methods.closed_form import edit_rows, encoder_rows, last_token_index, weights_of

FLOW = ("sd3", "flux")
KEY = "transformer.context_embedder.weight"


def _eos_row(tokenizer: Any, text: str) -> int:
    """Position of the token before the end token, found by id (T5's ``</s>``, CLIP's end-of-text)."""
    ids = tokenizer(text).input_ids
    return ids.index(tokenizer.eos_token_id) - 1


def _key_rows(pipe: Any, family: str, text: str) -> list[int]:
    """The rows of ``hidden`` a concept's keys come from, found from the tokenizers alone."""
    if family == "flux":
        return [_eos_row(pipe.tokenizer_2, text)]
    return [_eos_row(pipe.tokenizer, text), pipe.tokenizer_max_length + _eos_row(pipe.tokenizer_3, text)]


def _all_params(pipe: Any) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, m in pipe.components.items() if isinstance(m, torch.nn.Module)
            for n, p in m.named_parameters()}


def test_last_token_rows_on_sd3_and_flux_match_the_encoders() -> None:
    flux = tiny_pipeline("flux")
    assert family_of(flux).last_token_rows(flux, "a red circle") == (2,)  # ▁a ▁red ▁circle </s>: T5 has no start token
    assert family_of(flux).last_token_rows(flux, "") == (0,)  # </s>
    ids = flux.tokenizer_2("a red circle").input_ids
    assert flux.tokenizer_2.convert_ids_to_tokens(ids)[2] == "\u2581circle"
    sd3 = tiny_pipeline("sd3")
    clip_ids = sd3.tokenizer("a red circle").input_ids
    rows = family_of(sd3).last_token_rows(sd3, "a red circle")
    assert rows == (len(clip_ids) - 2, 77 + 2) and clip_ids[rows[0] + 1] == sd3.tokenizer.eos_token_id
    assert family_of(sd3).last_token_rows(sd3, "") == (0, 77) and last_token_index(sd3, "a red circle") == rows[0]
    # the rows are where diffusers' encode_prompt puts those tokens: CLIP-L | CLIP-G side by side, then T5 below
    hidden = encoder_rows(sd3, ["a red circle"])[0]
    with torch.no_grad():
        clip_l = sd3.text_encoder(torch.tensor([clip_ids]), output_hidden_states=True).hidden_states[-2][0, rows[0]]
        t5_ids = sd3.tokenizer_3("a red circle", padding="max_length", max_length=family_of(sd3).max_sequence_length).input_ids
        t5 = sd3.text_encoder_3(torch.tensor([t5_ids]))[0][0, 2]  # T5 attends to its padding: pad as the pipeline does
    assert torch.allclose(hidden[rows[0], : clip_l.shape[0]], clip_l.double(), atol=1e-5)
    assert torch.allclose(hidden[rows[1]], t5.double(), atol=1e-5)


@pytest.mark.parametrize("family", FLOW)
def test_uce_changes_only_the_context_embedder_weight(family: str) -> None:
    pipe = tiny_pipeline(family)
    before = _all_params(pipe)
    result = erasekit.erase(pipe, "circle", method="uce")
    assert set(result.delta) == {KEY} and result.family == family
    assert all(torch.equal(v, before[k]) for k, v in _all_params(pipe).items()), "erase left the pipeline changed"
    after = _all_params(result.apply(pipe))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {KEY}  # the embedder's bias, every block and every text encoder bit-identical


@pytest.mark.parametrize("family", FLOW)
def test_uce_maps_the_target_rows_to_the_guide_and_keeps_preserved_rows(family: str) -> None:
    pipe = tiny_pipeline(family)
    target, guide, kept = "circle", "square", "ring"
    hidden = encoder_rows(pipe, [target, guide, kept]).float()
    k_t, k_g, k_p = (hidden[i, _key_rows(pipe, family, t)] for i, t in enumerate((target, guide, kept)))
    embed = pipe.transformer.context_embedder
    with torch.no_grad():
        old_t, old_g, old_p = embed(k_t), embed(k_g), embed(k_p)
        result = erasekit.erase(pipe, target, method="uce", guide=guide, preserve=[kept], lam=0.1)
        result.apply(pipe)
        new_t, new_p = embed(k_t), embed(k_p)
    for row in range(len(k_t)):  # every key row (SD3: the CLIP row and the T5 row) moves toward the guide's
        assert (new_t[row] - old_g[row]).norm() < 0.2 * (old_t[row] - old_g[row]).norm()
    assert (new_p - old_p).norm() < 0.05 * old_p.norm()
    assert (new_t - old_t).norm() > 10 * (new_p - old_p).norm()


@pytest.mark.parametrize("family", FLOW)
def test_through_eos_rows_are_aligned_per_text_part(family: str) -> None:
    pipe = tiny_pipeline(family)
    rows = edit_rows(pipe, ["a red circle"], [""], ["ring"], "through-eos")
    fam = family_of(pipe)
    ends = fam.part_ends(pipe)  # in each part, rows from the later of the two last tokens to the part's end
    expected = sum(end - max(a, b) for a, b, end in zip(fam.last_token_rows(pipe, "a red circle"), fam.last_token_rows(pipe, ""), ends))
    assert rows.erase_keys.shape == rows.guide_rows.shape == (expected, fam.key_width(pipe))
    assert rows.preserve_keys.shape[0] == ends[-1]  # every row of the preserved prompt
    assert set(erasekit.erase(pipe, "circle", method="uce", key_rows="through-eos").delta) == {KEY}


@pytest.mark.parametrize("family", FLOW)
def test_rece_runs_one_round_on_the_context_embedder(family: str) -> None:
    pipe = tiny_pipeline(family)
    rece = erasekit.erase(pipe, "circle", method="rece", budget="tiny")
    uce = erasekit.erase(pipe, "circle", method="uce", key_rows="through-eos", retain_empty=True)
    assert set(rece.delta) == set(uce.delta) == {KEY}
    assert [h.get("round") for h in rece.history if "stage" in h] == [0, 1]
    assert not torch.allclose(rece.delta[KEY], uce.delta[KEY], atol=1e-6), "RECE's round must change the weights beyond UCE"
    assert rece.delta[KEY].shape == weights_of(pipe)["context_embedder.weight"].shape


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flow")
    return {f: build_tiny(f, root / f) for f in FLOW}


@pytest.mark.parametrize("family", FLOW)
def test_cli_erase_uce_then_generate_with_the_delta(family: str, folders: dict[str, Path], tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.result import load_result

    runner, model, run = CliRunner(), str(folders[family]), tmp_path / "run"
    erased = runner.invoke(app, ["erase", "--model", model, "--concept", "circle", "--method", "uce", "--out", str(run)])
    assert erased.exit_code == 0, erased.output
    assert set(load_result(run / "delta.safetensors").delta) == {KEY}
    grid = runner.invoke(app, ["generate", "--model", model, "--delta", str(run), "--prompt", "a red circle", "--images", "1",
                               "--steps", "2", "--out", str(tmp_path / "g.png")])
    assert grid.exit_code == 0, grid.output
    assert (tmp_path / "g.png").read_bytes().startswith(b"\x89PNG")
