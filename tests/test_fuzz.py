"""Property-based fuzzing of the CLI and the config file: every input ends in a result or a one-line error
(exit code 2), never a traceback and never a partial output."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from conftest import tiny_pipeline
from erasekit.cli import app

runner = CliRunner()
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
TINY = ["--iterations", "1", "--ddim-steps", "1", "--k", "4", "--n-centres", "2"]

texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=12),
    st.just("word " * 90),
    st.sampled_from(["", " ", "\t", "\x00", "-", "--k", "circle\nstar", "🔥", "ring"]),
)
numbers = st.one_of(
    st.integers(-3, 3).map(str), st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", "", "1.5", "true", "五", "1e-3"]), st.text(max_size=6)
)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny pipeline folder and a small word list, shared by the fuzz cases."""
    root = tmp_path_factory.mktemp("fuzz")
    tiny_pipeline().save_pretrained(root / "sd")
    (root / "words.txt").write_text("\n".join(["ring", "moon", "square", "star", "dog", "cat", "tree", "car"]))
    return root / "sd", root / "words.txt"


def _assert_clean(result, out_dir: Path, created: Path | None = None) -> None:  # type: ignore[no-untyped-def]
    """Exit 0, or exit 2 with exactly one `error:` line; never an uncaught exception or a half-written output."""
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {result.exception!r}\n{result.output[-800:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1, result.output[-800:]
        if created is not None:
            assert not created.exists()
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.name.endswith((".tmp", ".partial"))]
    assert not leftovers, leftovers


@FUZZ
@given(concept=texts)
def test_fuzz_erase_concepts(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, concept: str) -> None:
    sd, words = folders
    out_dir = tmp_path_factory.mktemp("erase")
    res = runner.invoke(app, ["erase", "--model", str(sd), "-c", concept, "--method", "esd-x", "--out", str(out_dir / "run"),
                              "--iterations", "1", "--ddim-steps", "1"])
    _assert_clean(res, out_dir, out_dir / "run")


@FUZZ
@given(flag=st.sampled_from(["--iterations", "--k", "--n-centres", "--lr", "--ddim-steps", "--gumbel-temperature", "--rollout-reuse",
                             "--preserve-weight", "--lora-rank", "--train-method", "--faithful", "--concept-space", "--start-guidance"]),
       value=numbers)
def test_fuzz_method_flags(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, flag: str, value: str) -> None:
    sd, words = folders
    out_dir = tmp_path_factory.mktemp("flags")
    args = ["erase", "--model", str(sd), "-c", "circle", "--method", "eap", "--out", str(out_dir / "run"), "--concept-space", str(words), *TINY]
    if flag == "--iterations" and value.strip().lstrip("-").isdigit() and int(value) > 3:
        value = "3"
    res = runner.invoke(app, [*args, flag, value])
    _assert_clean(res, out_dir, out_dir / "run")


toml_values = st.one_of(st.integers(-5, 5), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8), st.booleans(),
                        st.lists(st.integers(), max_size=2))


@FUZZ
@given(table=st.dictionaries(st.sampled_from(["iterations", "k", "lr", "gumbel_temperature", "seed", "faithful", "train_method", "bogus", "n-centres"]),
                             toml_values, max_size=3),
       raw=st.one_of(st.none(), st.text(max_size=40)))
def test_fuzz_toml_config(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, table: dict, raw: str | None) -> None:
    import tomli_w

    sd, words = folders
    out_dir = tmp_path_factory.mktemp("toml")
    cfg = out_dir / "cfg.toml"
    if raw is not None:
        cfg.write_text(raw, encoding="utf-8", errors="surrogatepass")
    else:
        table = {k: (min(v, 2) if k == "iterations" and isinstance(v, (int, float)) and not isinstance(v, bool) and v == v else v)
                 for k, v in table.items()}
        cfg.write_bytes(tomli_w.dumps({"eap": table}).encode())
    # the file's own iterations (capped above) are fuzzed; otherwise keep the run to one step
    steps = [] if raw is None and "iterations" in table else ["--iterations", "1"]
    res = runner.invoke(app, ["erase", "--model", str(sd), "-c", "circle", "--method", "eap", "--out", str(out_dir / "run"),
                              "--concept-space", str(words), "--config", str(cfg), "--k", "4", "--n-centres", "2", "--ddim-steps", "1", *steps])
    _assert_clean(res, out_dir, out_dir / "run")


@FUZZ
@given(prompt=texts, images=numbers, steps=numbers)
def test_fuzz_generate(folders: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory, prompt: str, images: str, steps: str) -> None:
    sd, _ = folders
    out_dir = tmp_path_factory.mktemp("gen")
    images = "1" if images.strip().isdigit() and int(images) > 2 else images
    steps = "1" if steps.strip().isdigit() and int(steps) > 2 else steps
    res = runner.invoke(app, ["generate", "--model", str(sd), "-p", prompt, "--images", images, "--steps", steps, "--out", str(out_dir / "g.png")])
    _assert_clean(res, out_dir, out_dir / "g.png")


@FUZZ
@given(objects=texts, styles=st.one_of(st.none(), texts))
def test_fuzz_world_render(tmp_path_factory: pytest.TempPathFactory, objects: str, styles: str | None) -> None:
    out_dir = tmp_path_factory.mktemp("render")
    args = ["world", "render", "--out", str(out_dir / "grid.png"), "--objects", objects] + (["--styles", styles] if styles is not None else [])
    res = runner.invoke(app, args)
    _assert_clean(res, out_dir, out_dir / "grid.png")
