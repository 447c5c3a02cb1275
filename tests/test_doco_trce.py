"""DoCo and TRCE: their equations on cases with known answers, their stages and trained sets, and bad input refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import erasekit
import erasekit.methods.doco as doco
import erasekit.methods.trce as trce
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.methods import get_method, make_config
from erasekit.methods.closed_form import encoder_rows, weights_of

# ---- DoCo ----

def test_surgery_removes_exactly_the_conflicting_part_and_the_reference_formula_differs_where_the_norm_is_not_one() -> None:
    keep = [torch.tensor([-1.0, 1.0])]
    out, conflicts = doco.surgery([torch.tensor([2.0, 0.0])], keep, "project", 1.0)
    assert conflicts == 1 and torch.allclose(out[0], torch.tensor([1.0, 1.0]))  # g - (g.k / |k|^2) k: now orthogonal to k
    assert float(out[0] @ keep[0]) == pytest.approx(0.0)
    ref, _ = doco.surgery([torch.tensor([2.0, 0.0])], keep, "reference", 1.0)
    assert torch.allclose(ref[0], torch.tensor([1.5, 0.5]))  # g - cos(g, k) k / |k| (DoCo's code)
    unit, _ = doco.surgery([torch.tensor([1.0, 0.0])], keep, "reference", 1.0)
    assert torch.allclose(unit[0], torch.tensor([0.5, 0.5]))  # equal to the projection where |g| = 1
    agree, none = doco.surgery([torch.tensor([1.0, 2.0])], keep, "project", 1.0)
    assert none == 0 and torch.equal(agree[0], torch.tensor([1.0, 2.0]))  # no conflict: untouched


def test_x0_of_recovers_the_clean_latent_at_each_samples_own_timestep() -> None:
    pipe = tiny_pipeline()
    family = erasekit.families.family_of(pipe)
    schedule = family.schedule(pipe, 10)
    x0, eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([5, 400, 990])
    a = schedule.alphas[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    assert torch.allclose(doco.x0_of(schedule, x_t, eps, t), x0, atol=1e-4)


def test_warm_up_trains_the_discriminator_alone_and_the_fool_loss_leaves_it_untouched() -> None:
    pipe = tiny_pipeline()
    result = erasekit.erase(pipe, "circle", method="doco", budget="tiny", iterations=3, warm_up=2)
    steps = [h for h in result.history if "step" in h]
    assert [h["erase_loss"] for h in steps[:2]] == [0.0, 0.0] and steps[2]["erase_loss"] > 0
    config = make_config(get_method("doco"), "tiny")
    disc = doco.Discriminator((4, 8, 8), config, "hash", torch.Generator().manual_seed(0))
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    disc.fool_loss(x).backward()
    assert x.grad is not None and all(p.grad is None for p in disc.net.parameters())


def test_a_discriminator_from_another_run_is_refused_in_one_line() -> None:
    config = make_config(get_method("doco"), "tiny")
    mine = doco.Discriminator((4, 8, 8), config, "hash-a", torch.Generator().manual_seed(0))
    other = doco.Discriminator((4, 8, 8), config, "hash-b", torch.Generator().manual_seed(0))
    tensors, meta = other.state()
    with pytest.raises(ErasekitError, match="another run") as err:
        mine.load_state(tensors, meta)
    assert "\n" not in str(err.value)
    same = doco.Discriminator((4, 8, 8), config, "hash-a", torch.Generator().manual_seed(1))
    same.load_state(*mine.state())
    assert all(torch.equal(a, b) for a, b in zip(same.net.state_dict().values(), mine.net.state_dict().values()))


@pytest.mark.parametrize("bad, match", [({"warm_up": 3}, "warm_up"), ({"surgery": "pcgrad"}, "surgery"), ({"precision": "bf16"}, "fp32"),
                                        ({"train_method": "lora"}, "weights directly")])
def test_doco_refuses_bad_settings(bad: dict, match: str) -> None:
    with pytest.raises(ErasekitError, match=match):
        make_config(get_method("doco"), "tiny", **bad)


# ---- TRCE ----

def test_triplet_and_references_match_their_closed_form() -> None:
    a, p, n = torch.zeros(1, 4), torch.full((1, 4), 1.0), torch.full((1, 4), 2.0)
    assert trce.triplet(a, p, n, 0.5).item() == pytest.approx(max(0.0, 1.0 - 4.0 + 0.5))
    assert trce.triplet(a, n, p, 0.5).item() == pytest.approx(4.0 - 1.0 + 0.5)
    assert torch.equal(trce.guided(torch.tensor([2.0]), torch.tensor([1.0]), 15.0), torch.tensor([17.0]))


def test_stage1_maps_the_end_of_text_row_of_the_malicious_prompt_onto_the_safe_ones() -> None:
    pipe = tiny_pipeline()
    config = make_config(get_method("trce"), "tiny", stage="1", templates=1, safe="a square", lam=1e-6)
    result = erasekit.erase(pipe, "circle", method="trce", **{k: v for k, v in vars(config).items() if k in ("stage", "templates", "safe", "lam", "seed")})
    assert {k.split(".")[-2] for k in result.delta} == {"to_k", "to_v"}
    original = weights_of(pipe)
    rows = encoder_rows(pipe, ["circle", "a square"])
    eot_bad = len(pipe.tokenizer("circle").input_ids) - 1  # [BOS] circle [EOS]: row 2
    eot_good = len(pipe.tokenizer("a square").input_ids) - 1
    name = next(iter(original))
    w = result.delta[f"unet.{name}"].double()
    target = original[name] @ rows[1, eot_good]
    assert torch.allclose(w @ rows[0, eot_bad], target, atol=1e-4 * float(target.norm()))  # the EoT row now reads as the safe one's
    word = w @ rows[0, eot_bad - 1]
    assert not torch.allclose(word, original[name] @ rows[1, eot_good - 1], atol=1e-2)  # the word's own row is not the one mapped


def test_stage2_trains_self_attention_and_queries_on_top_of_stage1_and_builds_on_a_saved_stage1(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    first = erasekit.erase(pipe, "circle", method="trce", budget="tiny", stage="1")
    path = first.save(tmp_path / "stage1.safetensors")
    both = erasekit.erase(pipe, "circle", method="trce", budget="tiny")
    alone = erasekit.erase(pipe, "circle", method="trce", budget="tiny", stage="2", stage1=str(path))
    assert both.delta.keys() == alone.delta.keys() and all(torch.equal(both.delta[k], alone.delta[k]) for k in both.delta)
    stage2 = {k for k in both.delta if k not in first.delta}
    assert stage2 and all(".attn1." in k or ".attn2.to_q." in k for k in stage2)
    assert all(torch.equal(both.delta[k], first.delta[k]) for k in first.delta)  # stage 2 leaves stage 1's matrices as solved
    assert all(torch.equal(v, tiny_pipeline().unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items()), "the pipeline was left changed"


def test_stage2_alone_needs_a_trce_stage1_result(tmp_path: Path) -> None:
    with pytest.raises(ErasekitError, match="stage1=PATH"):
        make_config(get_method("trce"), "tiny", stage="2")
    uce = erasekit.erase(tiny_pipeline(), "circle", method="uce").save(tmp_path / "uce.safetensors")
    with pytest.raises(ErasekitError, match="not a trce stage-1"):
        erasekit.erase(tiny_pipeline(), "circle", method="trce", budget="tiny", stage="2", stage1=str(uce))
    with pytest.raises(ErasekitError, match="stage1 is read only"):
        make_config(get_method("trce"), "tiny", stage1=str(uce))


def test_toy_pairs_hold_out_every_other_indirect_word() -> None:
    from erasekit.world.vocab import load_vocab

    words = load_vocab().indirect_words
    pairs = trce.toy_pairs()
    seen = {w for w in words if any(f" {w} " in f" {bad} " for bad, _ in pairs)}
    assert seen == set(words[::2]) and all("skull" not in good for _, good in pairs)
    assert math.isclose(len(seen), len(words) / 2)


def test_a_pairs_file_is_read_and_a_bad_one_refused(tmp_path: Path) -> None:
    good = tmp_path / "pairs.txt"
    good.write_text("# malicious<TAB>safe\nnaked person\tperson wearing clothes\nnudity\t\n")
    config = make_config(get_method("trce"), "tiny", pairs=str(good))
    assert trce.read_pairs(config, ["nudity"]) == [("naked person", "person wearing clothes"), ("nudity", "")]
    bad = tmp_path / "bad.txt"
    bad.write_text("\tsafe only\n")
    with pytest.raises(ErasekitError, match="malicious<TAB>safe"):
        trce.read_pairs(make_config(get_method("trce"), "tiny", pairs=str(bad)), ["nudity"])
    with pytest.raises(ErasekitError, match="no pairs file"):
        trce.read_pairs(make_config(get_method("trce"), "tiny", pairs=str(tmp_path / "none.txt")), ["nudity"])


def test_the_cli_refuses_stage2_without_stage1_and_a_wrong_stage1_in_one_line_writing_nothing(tiny_dir: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from erasekit.cli import app

    runner = CliRunner()
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(b"not a delta")
    for extra in (["--stage", "2"], ["--stage", "2", "--stage1", str(wrong)]):
        out = tmp_path / f"run-{len(extra)}"
        done = runner.invoke(app, ["erase", "--model", str(tiny_dir), "-c", "circle", "--method", "trce", "--budget", "tiny", "--out", str(out), *extra])
        lines = done.output.strip().splitlines()
        assert done.exit_code == 2 and "Traceback" not in done.output and [line for line in lines if line.startswith("error:")] == lines[-1:], done.output
        assert not out.exists()


def test_the_toy_anchor_is_an_object_apart_from_the_targets_and_their_look_alikes() -> None:
    from erasekit.methods.ca import toy_anchor

    assert toy_anchor(["circle"]) == "square" and toy_anchor(["Ring"]) == "square"
    assert toy_anchor(["square"]) == toy_anchor(["diamond"]) == toy_anchor(["circle", "diamond"]) == "triangle"
    assert toy_anchor(["square", "arrow"]) == ""  # neither choice is free: the empty prompt, CA's and DoCo's default
