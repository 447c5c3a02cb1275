"""Co-Erasing and image prompts: the refinement and blur on known answers, 'no image' exact, the stages, the adapter, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
import erasekit
import erasekit.image_prompt as ip
from conftest import tiny_pipeline
from erasekit.errors import ErasekitError
from erasekit.families import Cond, family_of
from erasekit.families.base import is_adapter
from erasekit.methods import get_method, make_config
from erasekit.methods.co_erasing import blur
from erasekit.models import weights_hash
from erasekit.world.adapter import AdapterConfig, AdapterTrainer


def tiny_adapter(folder: Path, seed: int = 0) -> Path:
    """A random IP-Adapter for :func:`tiny_pipeline` (16-wide cross-attention), saved to ``folder``."""
    return conftest.tiny_adapter(tiny_pipeline().unet, folder, seed)


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_text_guided_refinement_is_the_softmax_mix_of_the_prompts_rows() -> None:
    hidden = torch.tensor([[[10.0, 0.0], [0.0, 10.0], [0.0, 0.0]]])  # three text rows, d = 2
    tokens = torch.tensor([[[4.0, 0.0], [0.0, 0.0]]])  # one token along row 0, one orthogonal to every row
    out = ip.text_guided(tokens, hidden)
    w = torch.softmax(torch.tensor([40.0, 0.0, 0.0]) / 2**0.5, dim=0)
    assert torch.allclose(out[0, 0], w @ hidden[0], atol=1e-5) and out[0, 0, 0] > 9.99  # picks row 0
    assert torch.allclose(out[0, 1], hidden[0].mean(0), atol=1e-6)  # no preference: the plain mean of the rows


def test_blur_is_torchvisions_gaussian_for_kernel_3() -> None:
    x = torch.zeros(1, 2, 5, 5)
    x[0, :, 2, 2] = 1.0
    out = blur(x, 3)
    side = np.exp(-1 / (2 * 0.8**2))  # sigma 0.8 for a 3-kernel (torchvision's rule)
    k = np.array([side, 1.0, side]) / (1 + 2 * side)
    assert torch.allclose(out[0, 0, 1:4, 1:4], torch.tensor(np.outer(k, k), dtype=torch.float32), atol=1e-6)
    assert torch.allclose(blur(torch.full((1, 4, 6, 6), 3.0), 3), torch.full((1, 4, 6, 6), 3.0))  # constants stay
    assert torch.equal(blur(x, 0), x)


def test_zero_image_tokens_give_exactly_the_model_without_adapter(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    family = family_of(pipe)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    cond = family.encode(pipe, ["a circle", ""])
    before = family.predict(pipe.unet, x, t, cond)
    ip.attach_adapter(pipe, tiny_adapter(tmp_path / "ad"))
    tokens = ip.image_tokens(pipe, [picture(0), picture(1)])
    assert tokens.shape == (2, 4, 16)
    with torch.no_grad():
        none = family.predict(pipe.unet, x, t, Cond({**cond.parts, ip.PART: ip.no_image(tokens)}))
        implied = family.predict(pipe.unet, x, t, cond)  # no image part given: no image
        seen = family.predict(pipe.unet, x, t, Cond({**cond.parts, ip.PART: tokens}))
    assert torch.allclose(none, before, atol=1e-6) and torch.allclose(implied, before, atol=1e-6)
    assert (seen - before).abs().max() > 1e-3  # an image does reach the output
    assert weights_hash(pipe) == weights_hash(tiny_pipeline())  # the adapter is not part of the model's identity
    assert not any(is_adapter(n) for n in family.parameters(pipe.unet, "xattn"))  # nor of what a method trains


def test_stage_two_trains_the_unets_own_weights_and_leaves_the_pipeline_as_it_was(tmp_path: Path) -> None:
    pipe = tiny_pipeline()
    before = weights_hash(pipe)
    adapter = tiny_adapter(tmp_path / "ad")
    result = erasekit.erase(pipe, "circle", method="co-erasing", budget="tiny", train_method="xattn", adapter=str(adapter))
    assert result.delta and all(k.startswith("unet.") and "attn2." in k and ".processor." not in k for k in result.delta)
    assert [h.get("stage") for h in result.history if "stage" in h] == [2]
    assert len([h for h in result.history if "stage1_step" in h]) == 2 and len([h for h in result.history if "step" in h]) == 2  # text steps, image steps
    assert weights_hash(pipe) == before and not ip.has_adapter(pipe) and pipe.unet.encoder_hid_proj is None


def test_stage_two_alone_on_a_saved_stage_one_gives_the_same_weights_as_both(tmp_path: Path) -> None:
    adapter = str(tiny_adapter(tmp_path / "ad"))
    both = erasekit.erase(tiny_pipeline(), "circle", method="co-erasing", budget="tiny", adapter=adapter)
    one = erasekit.erase(tiny_pipeline(), "circle", method="co-erasing", budget="tiny", adapter=adapter, stage="1")
    one.save(tmp_path / "one.safetensors")
    two = erasekit.erase(tiny_pipeline(), "circle", method="co-erasing", budget="tiny", adapter=adapter, stage="2", stage1=str(tmp_path / "one.safetensors"))
    assert set(both.delta) == set(two.delta) and all(torch.equal(both.delta[k], two.delta[k]) for k in both.delta)
    assert any(not torch.equal(one.delta[k], both.delta[k]) for k in one.delta)  # stage 2 did change them


def test_bad_input_is_refused_in_one_line(tmp_path: Path) -> None:
    spec = get_method("co-erasing")
    with pytest.raises(ErasekitError, match="stage 2 builds on"):
        make_config(spec, "tiny", stage="2")
    with pytest.raises(ErasekitError, match="odd kernel"):
        make_config(spec, "tiny", blur=4)
    uce = erasekit.erase(tiny_pipeline(), "circle", method="uce")
    uce.save(tmp_path / "uce.safetensors")
    with pytest.raises(ErasekitError, match="not a text erasure"):
        erasekit.erase(tiny_pipeline(), "circle", method="co-erasing", budget="tiny", adapter=str(tmp_path), stage="2", stage1=str(tmp_path / "uce.safetensors"))
    with pytest.raises(ErasekitError, match="needs an image adapter"):
        erasekit.erase(tiny_pipeline(), "circle", method="co-erasing", budget="tiny")  # a non-toy model names no adapter
    (tmp_path / "noenc").mkdir()
    (tmp_path / "noenc" / "ip_adapter.safetensors").write_bytes(b"")
    with pytest.raises(ErasekitError, match="no image_encoder/"):
        ip.attach_adapter(tiny_pipeline(), tmp_path / "noenc")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ErasekitError, match="is not an image"):
        ip.load_images([tmp_path / "text.png"])


def run_cli(args: list[str]) -> tuple[int, str]:
    from typer.testing import CliRunner

    from erasekit.cli import app

    done = CliRunner().invoke(app, args)
    return done.exit_code, done.output


def test_generate_cli_with_an_image_prompt(tmp_path: Path) -> None:
    tiny = tmp_path / "tiny"
    tiny_pipeline().save_pretrained(tiny)
    adapter = tiny_adapter(tmp_path / "ad")
    picture(0).save(tmp_path / "p.png")
    (tmp_path / "bad.png").write_text("text")
    base = ["generate", "-m", str(tiny), "-p", "a circle", "--images", "1", "--steps", "2"]
    code, out = run_cli([*base, "--out", str(tmp_path / "none.png"), "--image-prompt", str(tmp_path / "p.png")])
    assert code == 2 and "needs an image adapter" in out and "Traceback" not in out and not (tmp_path / "none.png").exists()
    code, out = run_cli([*base, "--out", str(tmp_path / "bad_out.png"), "--image-prompt", str(tmp_path / "bad.png"), "--image-adapter", str(adapter)])
    assert code == 2 and "is not an image" in out and not (tmp_path / "bad_out.png").exists()
    code, out = run_cli([*base, "--out", str(tmp_path / "grid.png"), "--image-prompt", str(tmp_path / "p.png"), "--image-adapter", str(adapter)])
    assert code == 0, out
    code, _ = run_cli([*base, "--out", str(tmp_path / "plain.png")])
    assert code == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "grid.png")), np.asarray(Image.open(tmp_path / "plain.png")))


def test_the_adapter_run_resumes_to_the_same_weights_and_refuses_other_settings(tmp_path: Path) -> None:
    small = dict(n_images=64, batch_size=4, checkpoint_every=1)
    AdapterTrainer(tmp_path / "a", AdapterConfig(steps=1, **small)).run()
    AdapterTrainer(tmp_path / "a", AdapterConfig(steps=2, **small)).run()  # resumes from step 1
    AdapterTrainer(tmp_path / "b", AdapterConfig(steps=2, **small)).run()
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / n / "ip_adapter" / ip.WEIGHTS)) for n in "ab")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ErasekitError, match="other settings"):
        AdapterTrainer(tmp_path / "a", AdapterConfig(steps=2, **{**small, "lr": 1e-3}))
    pipe = tiny_pipeline()
    with pytest.raises(ErasekitError, match="cannot load the image adapter"):
        ip.attach_adapter(pipe, tmp_path / "a" / "ip_adapter")  # the toy's adapter is 128 wide, this model 16


def test_world_render_bare_writes_one_unlabelled_image_and_refuses_several(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from erasekit.world.cli import app

    done = CliRunner().invoke(app, ["render", "--objects", "circle", "--colours", "red", "--styles", "plain", "--bare", "--scale", "2", "--out", str(tmp_path / "c.png")])
    assert done.exit_code == 0, done.output
    assert np.asarray(Image.open(tmp_path / "c.png")).shape == (64, 64, 3)
    done = CliRunner().invoke(app, ["render", "--objects", "circle,ring", "--colours", "red", "--styles", "plain", "--bare", "--out", str(tmp_path / "two.png")])
    assert done.exit_code == 2 and "--bare writes one image" in done.output and not (tmp_path / "two.png").exists()
