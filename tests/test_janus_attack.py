"""`erasekit attack` on a Janus model: the adversarial-word search against the tiny random Janus, and the command end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from erasekit.attack.janus_run import janus_base
from erasekit.attack.janus_search import janus_candidates, plain_losses, prefix_length, search_janus_tokens
from erasekit.attack.run import AttackConfig, _toy_words
from erasekit.attack.search import Candidates
from erasekit.autoregressive import Janus, encode_prompts, image_logits, load_janus
from erasekit.cli import app
from erasekit.result import ErasureResult

torch.set_num_threads(1)
runner = CliRunner()
PROMPTS = ["a red circle", "an image of a circle"]
SMALL = ["--n-prompts", "2", "--tokens", "2", "--iterations", "6"]


def _one_error(res: Any) -> str:
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.fixture(scope="module")
def janus(janus_dir: Path) -> Janus:
    return load_janus(janus_dir)


@pytest.fixture(scope="module")
def base(janus: Janus) -> torch.Tensor:
    """The base model's image tokens of PROMPTS (the search's target), drawn as the attack draws them."""
    return janus_base(janus, PROMPTS, AttackConfig(guidance=5.0))[0]


@pytest.fixture(scope="module")
def candidates(janus: Janus) -> Candidates:
    return janus_candidates(janus, _toy_words(), ["circle"])


def test_candidates_are_whole_words_that_stay_one_token_in_the_prompt_format(janus: Janus, candidates: Candidates) -> None:
    assert len(candidates.ids) > 50 and not {"circle", "disc", "round", "disk"} & set(candidates.words)
    ids = encode_prompts(janus, [f"{candidates.words[0]} {candidates.words[-1]} a circle"]).input_ids[0].tolist()
    start = prefix_length(janus)
    assert ids[start : start + 2] == [int(candidates.ids[0]), int(candidates.ids[-1])]


def test_a_byte_level_bpe_tokenizer_offers_its_word_initial_tokens() -> None:
    """Janus-Pro's tokenizer is a byte-level BPE (no ``</w>``): its 'Ġword' tokens are the candidates, checked in the prompt format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<bos>", "<pad>", "<|User|>", "<|Assistant|>", "<begin_of_image>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    text = "the a red blue green circle square apple banana house tree river cat dog image of painting"
    backend.train_from_iterator([text] * 20, trainers.BpeTrainer(vocab_size=500, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", backend.token_to_id("<bos>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", pad_token="<pad>", additional_special_tokens=special[2:])
    janus = Janus(model=None, tokenizer=tok)
    found = janus_candidates(janus, ["apple"], ["circle"])
    assert "circle" not in found.words and {"apple", "banana", "house", "red"} <= set(found.words)
    ids = janus.tokenizer("<|User|>: banana red x").input_ids
    start = prefix_length(janus)
    assert ids[start : start + 2] == [int(found.ids[found.words.index(w)]) for w in ("banana", "red")]
    assert janus_candidates(janus, ["apple"], ["circle"], whole_vocab=False).words == ("apple",)


def test_recorded_losses_are_the_cross_entropy_of_real_discrete_prompts(janus: Janus, base: torch.Tensor, candidates: Candidates) -> None:
    found = search_janus_tokens(janus, PROMPTS, base, candidates, 3, 12, 0.3, [5, 6])
    adversarial = [f"{found.prefix(i)} {p}" for i, p in enumerate(PROMPTS)]
    for i, text in enumerate(adversarial):  # the best loss is image_logits' cross-entropy of the adversarial text, one prompt alone
        logits = image_logits(janus.model, encode_prompts(janus, [text]), base[i : i + 1])
        direct = torch.nn.functional.cross_entropy(logits[0].float(), base[i]).item()
        assert found.best_loss[i] == pytest.approx(direct, rel=1e-5, abs=1e-6)
        assert found.best_loss[i] <= found.initial_loss[i]
    assert found.plain_loss == pytest.approx(plain_losses(janus, PROMPTS, base).tolist(), rel=1e-6)
    assert len(found.loss_history) == 13 and all(len(w) == 3 for w in found.words)
    # one candidate: the answer is known, that word in every slot, and its loss at every step
    only = Candidates(candidates.ids[:1], candidates.words[:1])
    one = search_janus_tokens(janus, PROMPTS[:1], base[:1], only, 2, 2, 0.3, [0])
    assert one.words == [[only.words[0]] * 2] and one.best_loss == one.initial_loss
    assert one.best_loss[0] == pytest.approx(plain_losses(janus, [f"{only.words[0]} {only.words[0]} {PROMPTS[0]}"], base[:1]).item(), rel=1e-5)


def test_same_seed_gives_the_same_words_whatever_the_batch(janus: Janus, base: torch.Tensor, candidates: Candidates) -> None:
    first = search_janus_tokens(janus, PROMPTS, base, candidates, 3, 12, 0.3, [5, 6])
    again = search_janus_tokens(janus, PROMPTS, base, candidates, 3, 12, 0.3, [5, 6])
    assert again == first
    alone = search_janus_tokens(janus, PROMPTS[1:], base[1:], candidates, 3, 12, 0.3, [6])
    assert alone.token_ids == first.token_ids[1:] and alone.best_loss == pytest.approx(first.best_loss[1:], rel=1e-5)
    other = search_janus_tokens(janus, PROMPTS, base, candidates, 3, 0, 0.3, [7, 8])
    assert other.token_ids != search_janus_tokens(janus, PROMPTS, base, candidates, 3, 0, 0.3, [5, 6]).token_ids


def test_cli_attack_runs_on_a_janus_run_and_writes_its_outputs(ear_run: Path, janus: Janus, judge_dir: Path) -> None:
    res = runner.invoke(app, ["attack", str(ear_run), "-c", "circle", "--judge", str(judge_dir), *SMALL])
    assert res.exit_code == 0, res.output
    assert "ASR" in res.output
    folder = ear_run / "attack-circle"
    record = json.loads((folder / "attack.json").read_text())
    assert record["method"] == "ear" and record["erased"] == ["circle"] and record["grid"] == "attack.png"
    assert set(record["metrics"]) == {"asr", "adversarial_rate", "no_attack_rate", "base_rate"}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    assert record["settings"]["steps"] == 0 and record["settings"]["noise_draws"] == 0 and record["settings"]["guidance"] == 5.0
    assert record["loss"].startswith("mean cross-entropy") and len(record["loss_history"]) == 7
    start = prefix_length(janus)
    for p in record["prompts"]:  # the adversarial text tokenizes back to the searched ids, right after the user role
        assert p["adversarial_prompt"] == " ".join(p["adversarial_tokens"]) + " " + p["prompt"] and p["best_loss"] <= p["initial_loss"]
        assert encode_prompts(janus, [p["adversarial_prompt"]]).input_ids[0].tolist()[start : start + 2] == p["token_ids"]
    with Image.open(folder / "attack.png") as grid:
        assert grid.height > 2 * 16
    shown = runner.invoke(app, ["attack", str(ear_run), "-c", "circle", "--show-settings"]).output
    assert "--steps                0" in shown and "--guidance             5.0" in shown


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "3"], "--steps sets a diffusion sampler's steps"),
    (["--noise-draws", "2"], "--noise-draws sets the (t, noise) draws of the denoising loss"),
    (["--sd-delta"], "was made on a sd model and cannot load into a Janus model"),
])
def test_bad_input_on_janus_is_one_line_and_writes_nothing(extra: list[str], message: str, ear_run: Path, janus_dir: Path,
                                                           judge_dir: Path, tmp_path: Path) -> None:
    target = str(ear_run)
    if extra == ["--sd-delta"]:  # a diffusion delta given a Janus as its base
        sd = ErasureResult("esd-x", ("circle",), {"unet.conv_in.weight": torch.zeros(8, 4, 3, 3)}, base_model_id="tiny-sd", family="sd")
        target, extra = str(sd.save(tmp_path / "sd.safetensors")), ["--model", str(janus_dir)]
    out = tmp_path / "out"
    line = _one_error(runner.invoke(app, ["attack", target, "-c", "circle", "--judge", str(judge_dir), "--out", str(out), *SMALL, *extra]))
    assert message in line
    assert not out.exists()
