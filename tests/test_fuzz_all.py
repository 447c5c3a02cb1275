"""Fuzzing every numeric and path option of every command, every method / suite / attack setting, and the public
Python API (issue 22, item 2): each input ends in success or in exactly one `error:` line with exit code 2 (from
Python: one ErasekitError line), never a traceback, and a refused input leaves no file behind.

The options are read from the typer app and the settings dataclasses, so a new option or setting is fuzzed
without touching this file; only a new *command* needs a line in ``BASE`` (a test says so). The model loads and
the long work after validation are stubbed out (``Reached``): these properties exercise validation, fast. One
property (``test_accepted_settings_train_and_record_cleanly``) does train, on a tiny pipeline, whatever the
validation accepts, so a value that passes the checks but breaks the run (NaN in a record, a library's traceback)
is caught too. The slow suite (``-m slow``) runs ten times as many cases.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import erasekit
from conftest import tiny_pipeline
from erasekit.cli import app
from erasekit.errors import ErasekitError
from erasekit.methods import get_method
from fuzz_support import (
    BASE,
    OPTIONS,
    PLACES,
    PY_VALUES,
    RELATIVE,
    Option,
    cli_failure,
    cli_values,
    commands,
    fill,
    json_is_finite,
    kind_of,
    leftovers,
    py_failure,
    settings_classes,
    stubs,
)

runner = CliRunner()
FAST = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much])
SLOW = settings(FAST, max_examples=2000)


# ---- fixtures ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run folder of an 'erased' toy model (a one-tensor delta), and a tiny pipeline with a delta that fits it."""
    from erasekit.result import ErasureResult

    root = tmp_path_factory.mktemp("fuzz-all")
    run = root / "run"
    run.mkdir()
    ErasureResult("esd-x", ("circle",), {"unet.x": torch.zeros(1)}, base_model_id="toy", family="sd").save(run / "delta.safetensors")
    (run / "run.json").write_text(json.dumps({"model": "toy"}))
    pipe = tiny_pipeline()
    name, param = next(iter(pipe.unet.named_parameters()))
    from erasekit.models import weights_hash

    fits = ErasureResult("esd-x", ("circle",), {f"unet.{name}": param.detach().clone()}, base_model_id="tiny", base_hash=weights_hash(pipe))
    from erasekit.autoregressive import load_janus
    from erasekit.autoregressive.tiny import build_tiny_janus

    janus = load_janus(build_tiny_janus(root / "janus"))  # the autoregressive methods' model (ear)
    return {"root": root, "run": run, "pipe": pipe, "fits": fits, "janus": janus}


@pytest.fixture
def world(shared: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """``shared``, with the real work of every command stubbed out (``Reached``), run from inside its temporary folder."""
    for target, fn in stubs().items():
        monkeypatch.setattr(target, fn)
    monkeypatch.chdir(shared["root"])  # a relative path lands there, never in the repository
    return shared


def fresh(world: dict[str, Any]) -> Path:
    """An empty folder for one case."""
    return Path(tempfile.mkdtemp(dir=world["root"]))


def cli_case(world: dict[str, Any], option: Option, value: str) -> str | None:
    """Run one command with one fuzzed input; the failure, or None."""
    out = fresh(world)
    base = [fill(a, out, world["run"]) for a in BASE[option.command]]
    if option.method is not None:
        base += ["--method", option.method]
        if get_method(option.method).autoregressive:  # a repeated option takes the last value: the Janus model, not toy
            base += ["--model", str(world["janus"].name_or_path)]
    value = fill(value, out, world["run"])
    if option.flag:
        args = [*base, option.flag, value] if not value.startswith("-") else [*base, f"{option.flag}={value}"]
    else:  # the positional argument replaces the base's
        at = len(option.command)
        args = [*base[:at], value, *base[at + 1 :]] if len(base) > at else [*base, value]
        args = args if not value.startswith("-") else [*base[:at], *base[at + 1 :], "--", value]
    failure = cli_failure(runner.invoke(app, args), out)
    return None if failure is None else f"{' '.join(args)}: {failure}"


# ---- the properties ------------------------------------------------------------------------------------------

def test_every_command_has_a_base_invocation_and_every_settings_command_a_dataclass() -> None:
    found = dict(commands())
    assert set(found) <= set(BASE), f"add a valid, fast invocation of {set(found) - set(BASE)} to BASE"
    extra = {words for words, info in found.items() if (info.context_settings or {}).get("allow_extra_args")}
    assert extra == set(settings_classes()), "a command that takes extra flags needs its settings dataclass in settings_classes()"
    assert len(OPTIONS) > 100 and {o.kind for o in OPTIONS} == {"int", "float", "bool", "path"}


def _option_values() -> st.SearchStrategy[tuple[Option, str]]:
    return st.sampled_from(OPTIONS).flatmap(lambda o: st.tuples(st.just(o), cli_values(o.kind)))


@FAST
@given(case=_option_values())
def test_every_option_of_every_command_fails_in_one_line_or_runs(world: dict[str, Any], case: tuple[Option, str]) -> None:
    assert cli_case(world, *case) is None, cli_case(world, *case)


@pytest.mark.slow
@SLOW
@given(case=_option_values())
def test_every_option_of_every_command_fails_in_one_line_or_runs_many(world: dict[str, Any], case: tuple[Option, str]) -> None:
    assert cli_case(world, *case) is None


@pytest.mark.slow
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: f"{'-'.join(o.command)}{o.flag or ':arg'}{'@' + o.method if o.method else ''}")
def test_each_option_with_its_worst_values(world: dict[str, Any], option: Option) -> None:
    worst = {"int": ["-1", "99999999999999999999", "0"], "float": ["nan", "-1", "1e30", "inf"], "bool": ["maybe"],
             "path": ["", "/nonexistent/x", "{out}/new/deeper/x", "x" * 300]}[option.kind]
    failures = [f for v in worst if (f := cli_case(world, option, v)) is not None]
    assert not failures, failures


def method_fields() -> list[tuple[str, str]]:
    """Every (method, setting) pair of the registry."""
    from erasekit.methods import registry

    return [(name, f.name) for name, spec in sorted(registry().items()) for f in dataclasses.fields(spec.config_class)]


def erase_case(world: dict[str, Any], method: str, name: str, value: Any) -> str | None:
    """``erasekit.erase`` with one fuzzed keyword: one ErasekitError line, or it reaches training (stubbed)."""
    model = world["janus"] if get_method(method).autoregressive else world["pipe"]
    failure = py_failure(lambda: erasekit.erase(model, "circle", method=method, budget="tiny", **{name: value}), value)
    return None if failure is None else f"erase(method={method!r}, {name}={value!r}): {failure}"


def evaluate_case(world: dict[str, Any], target: Any, name: str, value: Any) -> str | None:
    """``erasekit.evaluate`` with one fuzzed keyword and a fuzzed target; nothing left behind when refused."""
    out = fresh(world)
    value = Path(fill(value, out, world["run"])) if isinstance(value, str) and "{" in value else value
    kwargs = {"images_per_class": 1, "steps": 1, "cache_dir": out / "cache", name: value}
    failure = py_failure(lambda: erasekit.evaluate(target, **kwargs), value)
    if failure is None and leftovers(out):
        failure = f"left behind: {leftovers(out)}"
    return None if failure is None else f"evaluate({target!r}, {name}={value!r}): {failure}"


def evaluate_keywords() -> list[str]:
    """The keywords of ``erasekit.evaluate`` a user sets (read from its signature)."""
    return [p for p in inspect.signature(erasekit.evaluate).parameters if p not in ("target", "progress", "command")]


@st.composite
def _python_calls(draw: st.DrawFn) -> tuple[str, Any, str, Any]:
    which = draw(st.sampled_from(["erase", "evaluate"]))
    if which == "erase":
        method, name = draw(st.sampled_from(method_fields()))
        return which, method, name, draw(PY_VALUES)
    target = draw(st.sampled_from(["run", "delta", "toy", "result", "pipe", "junk", "missing"]))
    return which, target, draw(st.sampled_from(evaluate_keywords())), draw(st.one_of(PY_VALUES, PLACES))


def python_case(world: dict[str, Any], call: tuple[str, Any, str, Any]) -> str | None:
    """One fuzzed call of the Python API."""
    which, first, name, value = call
    if which == "erase":
        return erase_case(world, first, name, value)
    targets = {"run": world["run"], "delta": world["run"] / "delta.safetensors", "toy": "toy", "result": world["fits"], "pipe": world["pipe"],
               "junk": 42, "missing": "/nonexistent/run"}
    return evaluate_case(world, targets[first], name, value)


@FAST
@given(call=_python_calls())
def test_the_python_api_raises_one_line_or_runs(world: dict[str, Any], call: tuple[str, Any, str, Any]) -> None:
    assert python_case(world, call) is None, python_case(world, call)


@pytest.mark.slow
@SLOW
@given(call=_python_calls())
def test_the_python_api_raises_one_line_or_runs_many(world: dict[str, Any], call: tuple[str, Any, str, Any]) -> None:
    assert python_case(world, call) is None


def save_load_case(world: dict[str, Any], place: str, overwrite: bool) -> str | None:
    """``result.save(place)`` then ``erasekit.load(pipe, what it wrote)``: a .safetensors file, or one line and nothing new."""
    out = fresh(world)
    (out / "file.txt").write_text("x")
    before = leftovers(out)
    target = fill(place, out, out / "run") if "{" in place else str(out / place.lstrip("/"))
    written: list[Path] = []
    failure = py_failure(lambda: written.append(world["fits"].save(target, overwrite=overwrite)), target)
    if failure is None and not written and leftovers(out) != before:
        failure = f"refused, but left {sorted(set(leftovers(out)) - set(before))}"
    if failure is None and written:
        if written[0].suffix.lower() != ".safetensors" or not written[0].is_file():
            failure = f"wrote {written[0]}"
        else:
            failure = py_failure(lambda: erasekit.load(world["pipe"], written[0].parent if written[0].name == "delta.safetensors" else written[0]))
    return None if failure is None else f"save({place!r}, overwrite={overwrite}): {failure}"


@settings(FAST, max_examples=60)
@given(place=st.one_of(PLACES, RELATIVE, st.sampled_from(["run", "run.v2", "d.pt", "d.SAFETENSORS", "file.txt", "a/b", "new/"])), overwrite=st.booleans())
def test_save_writes_a_safetensors_file_or_refuses_in_one_line(world: dict[str, Any], place: str, overwrite: bool) -> None:
    assert save_load_case(world, place, overwrite) is None, save_load_case(world, place, overwrite)


@pytest.mark.slow
@settings(FAST, max_examples=1000)
@given(place=st.one_of(PLACES, RELATIVE, st.sampled_from(["run", "run.v2", "d.pt", "d.SAFETENSORS", "file.txt", "a/b", "new/"])), overwrite=st.booleans())
def test_save_writes_a_safetensors_file_or_refuses_in_one_line_many(world: dict[str, Any], place: str, overwrite: bool) -> None:
    assert save_load_case(world, place, overwrite) is None


# ---- accepted values run: a real (tiny) training with whatever validation lets through -------------------------

SIZES = {"iterations": 2, "ddim_steps": 3, "anchor_images": 2, "k": 8, "n_centres": 3, "rounds": 1, "batch_size": 2, "rollout_reuse": 2,
         "rollout_share": 2, "kmeans_n_init": 2, "gumbel_topk": 2, "warm_up": 1, "disc_width": 8, "seeds_per_prompt": 1,
         "reg_trajectories": 2, "reg_batch": 2, "early_steps": 2, "templates": 2}


def training_case(folders: dict[str, Path], tmp: Path, method: str, name: str, value: str) -> str | None:
    """`erasekit erase` on a tiny model (SD, or Janus for an autoregressive method) with one fuzzed setting, for real: success
    with finite records, or one error line."""
    from erasekit.methods import make_config
    from erasekit.runs import _coerce

    folder = folders["janus" if get_method(method).autoregressive else "sd"]
    hints = typing.get_type_hints(get_method(method).config_class)
    try:
        parsed = _coerce(name, hints[name], value)
        if name in SIZES and isinstance(parsed, int) and not isinstance(parsed, bool):
            parsed = max(min(parsed, SIZES[name]), -1)  # big sizes are validation's business; here they would only take long
        make_config(get_method(method), "tiny", **{name: parsed})
    except ErasekitError:
        return None  # refused before anything ran: the validation properties cover that
    out = tmp / f"run-{method}-{name}"
    args = ["erase", "--model", str(folder), "-c", "circle", "--method", method, "--budget", "tiny", "--out", str(out),
            f"--{name.replace('_', '-')}={parsed}"]
    failure = cli_failure(runner.invoke(app, args), tmp, progress=True)
    if failure is None and out.exists():
        bad = [p.name for p in out.glob("*.json") if not json_is_finite(p)]
        failure = f"NaN or infinity in {bad}" if bad else None
    return None if failure is None else f"{' '.join(args)}: {failure}"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory, janus_dir: Path) -> dict[str, Path]:
    """A tiny SD pipeline saved as a diffusers folder, and a tiny random Janus folder."""
    folder = tmp_path_factory.mktemp("fuzz-train") / "sd"
    tiny_pipeline().save_pretrained(folder)
    return {"sd": folder, "janus": janus_dir}


def _numeric_settings() -> st.SearchStrategy[tuple[str, str, str]]:
    from erasekit.methods import registry

    pairs = [(m, f.name, kind_of(typing.get_type_hints(spec.config_class)[f.name])) for m, spec in sorted(registry().items())
             for f in dataclasses.fields(spec.config_class) if f.metadata.get("flag", True)]
    numeric = [(m, n, k) for m, n, k in pairs if k in ("int", "float")]
    return st.sampled_from(numeric).flatmap(lambda p: st.tuples(st.just(p[0]), st.just(p[1]), cli_values(p[2])))


@settings(FAST, max_examples=6)
@given(case=_numeric_settings())
def test_accepted_settings_train_and_record_cleanly(tiny_folder: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, case: tuple[str, str, str]) -> None:
    assert training_case(tiny_folder, tmp_path_factory.mktemp("t"), *case) is None


@pytest.mark.slow
@settings(FAST, max_examples=300)
@given(case=_numeric_settings())
def test_accepted_settings_train_and_record_cleanly_many(tiny_folder: dict[str, Path], tmp_path_factory: pytest.TempPathFactory, case: tuple[str, str, str]) -> None:
    assert training_case(tiny_folder, tmp_path_factory.mktemp("t"), *case) is None


def test_a_nan_never_reaches_a_json_record() -> None:
    from erasekit.models import json_dumps

    with pytest.raises(ErasekitError, match=r"non-finite number at metrics\.esr"):
        json_dumps({"metrics": {"esr": math.nan}})
    assert json.loads(json_dumps({"metrics": {"esr": 1.0}})) == {"metrics": {"esr": 1.0}}
