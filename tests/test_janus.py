"""The Janus family on a tiny random JanusForConditionalGeneration saved to a folder (built offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from erasekit.autoregressive import (
    check_resolution,
    decode_tokens,
    encode_prompts,
    generate,
    guided_logits,
    image_logits,
    image_size,
    image_token_count,
    load_janus,
    sample_image_tokens,
    train_parameters,
    unconditional,
)
from erasekit.autoregressive.tiny import build_tiny_janus
from erasekit.errors import ErasekitError

PROMPTS = ["a red circle", "a blue square in dotted style"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_janus(tmp_path_factory.mktemp("janus") / "tiny")


def test_tiny_janus_loads_from_its_folder_with_transformers_classes(folder: Path) -> None:
    from transformers import JanusForConditionalGeneration

    janus = load_janus(folder)
    assert isinstance(janus.model, JanusForConditionalGeneration)
    assert (image_token_count(janus.model), image_size(janus.model)) == (16, 16)
    assert not any(p.requires_grad for p in janus.model.parameters())
    ids = encode_prompts(janus, ["a red circle"]).input_ids[0].tolist()
    assert ids[0] == janus.bos_id and ids[-1] == janus.boi_id  # Janus's image-generation prompt: BOS ... <begin_of_image>


def test_folder_without_vq_model_is_refused_in_one_line(folder: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "no-vq"
    shutil.copytree(folder, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.vqmodel.")}, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ErasekitError, match="no VQ image tokenizer weights") as info:
        load_janus(broken)
    assert "\n" not in str(info.value)
    config = json.loads((folder / "config.json").read_text())
    del config["vq_config"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErasekitError, match="no vq_config"):
        load_janus(broken)


@pytest.mark.parametrize(("edit", "message"), [
    ({"num_hidden_layers": 3}, "lacks 9 weights its config.json asks for"),  # transformers would draw them at random
    ({"intermediate_size": 48}, "cannot load the Janus model"),  # weights of another shape
    ({"vocab_size": "many"}, "cannot load the Janus model"),  # a field of the wrong type
])
def test_config_the_loader_cannot_use_is_refused_in_one_line(folder: Path, tmp_path: Path, edit: dict, message: str) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(edit)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ErasekitError, match=message) as info:
        load_janus(broken)
    assert "\n" not in str(info.value)


def test_unusable_resolution_is_refused_in_one_line(folder: Path) -> None:
    janus = load_janus(folder)
    check_resolution(janus.model, 16)
    with pytest.raises(ErasekitError, match="cannot be tokenised") as info:
        check_resolution(janus.model, 24)
    assert "\n" not in str(info.value)
    with pytest.raises(ErasekitError, match="power of two"):
        build_tiny_janus(folder.parent / "bad", image_size=24, grid=4)


def test_same_seed_gives_identical_tokens_and_images(folder: Path) -> None:
    janus = load_janus(folder)
    prompts = encode_prompts(janus, PROMPTS)
    first = sample_image_tokens(janus, prompts, [0, 1], guidance=5.0)
    assert torch.equal(first, sample_image_tokens(janus, prompts, [0, 1], guidance=5.0))
    assert not torch.equal(first, sample_image_tokens(janus, prompts, [2, 3], guidance=5.0))
    # one generator per prompt: a prompt's tokens do not depend on the batch it is drawn in (left padding masked)
    alone = sample_image_tokens(janus, encode_prompts(janus, PROMPTS[1:]), [1], guidance=5.0)
    assert torch.equal(alone[0], first[1])
    images = generate(janus, PROMPTS, [0, 1])
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert np.array_equal(images, generate(janus, PROMPTS, [0, 1]))
    assert np.array_equal(images, decode_tokens(janus.model, first))


def test_cfg_with_scale_one_equals_the_conditional_branch(folder: Path) -> None:
    janus = load_janus(folder)
    prompts = encode_prompts(janus, PROMPTS)
    guided = sample_image_tokens(janus, prompts, [0, 1], guidance=1.0)
    assert torch.equal(guided, sample_image_tokens(janus, prompts, [0, 1], guidance=1.0, cfg=False))
    cond = image_logits(janus.model, prompts, guided)
    uncond = image_logits(janus.model, unconditional(janus, prompts), guided)
    assert torch.allclose(guided_logits(cond, uncond, 1.0), cond, atol=1e-6)
    assert not torch.allclose(guided_logits(cond, uncond, 5.0), cond)


def test_unconditional_branch_pads_all_but_bos_and_begin_of_image(folder: Path) -> None:
    janus = load_janus(folder)
    prompts = encode_prompts(janus, PROMPTS)
    ids = unconditional(janus, prompts).input_ids
    assert torch.equal(unconditional(janus, prompts).attention_mask, prompts.attention_mask)
    assert set(ids.unique().tolist()) == {janus.bos_id, janus.boi_id, janus.pad_id}
    assert (ids == janus.bos_id).sum() == 2 and torch.equal(ids[:, -1], torch.full((2,), janus.boi_id))


def test_teacher_forced_guided_logits_reproduce_transformers_own_greedy_janus_generation(folder: Path) -> None:
    from transformers import GenerationConfig

    janus = load_janus(folder)
    prompts = encode_prompts(janus, PROMPTS)
    config = GenerationConfig.from_pretrained(str(folder))
    config.do_sample, config.guidance_scale = False, 5.0
    reference = janus.model.generate(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask, generation_mode="image",
                                     generation_config=config)
    guided = guided_logits(image_logits(janus.model, prompts, reference), image_logits(janus.model, unconditional(janus, prompts), reference), 5.0)
    assert torch.equal(guided.argmax(-1), reference)
    # our sampler at a vanishing temperature is that greedy decoding too (same CFG, same prefix, same cache use)
    assert torch.equal(sample_image_tokens(janus, prompts, [0, 1], guidance=5.0, temperature=1e-5), reference)


def test_train_sets_select_by_name(folder: Path) -> None:
    model = load_janus(folder).model
    attn, mlp, head, full, lora = (set(train_parameters(model, s)) for s in ("attn", "mlp", "head", "full", "lora"))
    assert attn and all(".self_attn." in n for n in attn) and all(".mlp." in n for n in mlp)
    assert head == {n for n, _ in model.named_parameters() if n.startswith("model.generation_head.")}
    assert attn | mlp | head <= full and not any("vqmodel" in n or "vision_model" in n for n in full)
    # lora: the matrices a merged LoRA changes, the language model's attention projections (weights only)
    assert lora == {n for n in attn if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))} and len(lora) == 8
    with pytest.raises(ErasekitError, match="choose one of: attn, mlp, head, full, lora"):
        train_parameters(model, "xattn")
