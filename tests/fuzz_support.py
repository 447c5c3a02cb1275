"""The fuzzing harness behind tests/test_fuzz_all.py: every input a command or the Python API takes, read from the typer
app and the settings dataclasses; values that a shell or a caller can pass; and the rule each outcome must keep."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hypothesis import strategies as st
from typer.models import ArgumentInfo, OptionInfo

from erasekit.cli import app
from erasekit.errors import ErasekitError


class Reached(Exception):
    """Raised where the real work would start (a model load, a training, a world build): validation passed."""


# ---- the options, read from the app and the settings dataclasses -------------------------------------------

@dataclasses.dataclass(frozen=True)
class Option:
    """One fuzzable input of a command: a typer option or argument, or a settings-dataclass flag."""

    command: tuple[str, ...]
    flag: str  # "--seed"; "" for a positional argument
    kind: str  # int, float, bool or path (every str and Path input gets path-like and junk text)
    method: str | None = None  # erase: the method whose config declares the flag


def commands(typer_app: Any = app, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command of the app: its words (``("world", "render")``) and its registered info."""
    for info in typer_app.registered_commands:
        yield (*prefix, info.name or info.callback.__name__.replace("_", "-")), info
    for group in typer_app.registered_groups:
        yield from commands(group.typer_instance, (*prefix, group.name))


def kind_of(annotation: Any) -> str | None:
    """int, float, bool or path (any str or Path, and lists of them) for an annotation; None for other types."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    inner = typing.get_args(args[0])[0] if typing.get_origin(args[0]) is list else args[0]
    return {int: "int", float: "float", bool: "bool", str: "path", Path: "path"}.get(inner)


def typer_options(words: tuple[str, ...], info: Any) -> list[Option]:
    """The numeric, text and path inputs a command declares (its flags and positional arguments)."""
    hints = typing.get_type_hints(info.callback)
    found = []
    for name, param in inspect.signature(info.callback).parameters.items():
        default = param.default
        if not isinstance(default, (OptionInfo, ArgumentInfo)) or (kind := kind_of(hints.get(name))) in (None, "bool"):
            continue
        flags = [d for d in (getattr(default, "param_decls", None) or ()) if d.startswith("--") and "/" not in d]
        flag = "" if isinstance(default, ArgumentInfo) else (flags[0] if flags else "--" + name.replace("_", "-"))
        found.append(Option(words, flag, kind))
    return found


def settings_classes() -> dict[tuple[str, ...], list[tuple[str | None, type]]]:
    """The settings dataclasses behind the commands that take extra flags (erase: every method's config)."""
    from erasekit.attack.run import AttackConfig
    from erasekit.eval.suites import Settings
    from erasekit.methods import registry
    from erasekit.world.config import WorldTrainConfig
    from erasekit.world.janus_model import JanusTrainConfig

    return {("erase",): [(name, spec.config_class) for name, spec in sorted(registry().items())], ("evaluate",): [(None, Settings)],
            ("attack",): [(None, AttackConfig)], ("world", "train"): [(None, WorldTrainConfig)],
            ("world", "janus"): [(None, JanusTrainConfig)]}


def setting_options() -> list[Option]:
    """Every flag the settings dataclasses declare, typed by its field."""
    found = []
    for words, classes in settings_classes().items():
        for method, cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                if f.metadata.get("flag", True) and (kind := kind_of(hints[f.name])) is not None:
                    found.append(Option(words, "--" + f.name.replace("_", "-"), kind, method))
    return found


# a valid, fast invocation of each command ({out}: a fresh folder per case; {run}: an erased run folder); the
# fuzzed option is added to it (a repeated option takes the last value; a positional one replaces the first)
BASE: dict[tuple[str, ...], list[str]] = {
    ("erase",): ["erase", "--model", "toy", "-c", "circle", "--out", "{out}/run", "--iterations", "1"],
    ("generate",): ["generate", "--model", "toy", "-p", "circle", "--out", "{out}/g.png", "--images", "1", "--steps", "1"],
    ("evaluate",): ["evaluate", "{run}", "--images-per-class", "1", "--steps", "1", "--cache-dir", "{out}/cache"],
    ("report",): ["report", "{run}", "--out", "{out}/report.html"],
    ("spectrum",): ["spectrum", "{run}", "--concepts", "toy", "--out", "{out}", "--images-per-concept", "1", "--steps", "1"],
    ("compare",): ["compare", "-c", "circle", "--methods", "uce", "--out", "{out}/cmp", "--images-per-class", "1", "--steps", "1"],
    ("attack",): ["attack", "{run}", "-c", "circle", "--out", "{out}/atk", "--n-prompts", "1", "--iterations", "1"],
    ("methods",): ["methods"],
    ("demo",): ["demo", "--out", "{out}/demo"],
    ("world", "render"): ["world", "render", "--out", "{out}/r.png", "--objects", "circle", "--colours", "red", "--styles", "flat"],
    ("world", "train"): ["world", "train", "--out", "{out}/world"],
    ("world", "adapter"): ["world", "adapter", "--out", "{out}/adapter"],
    ("world", "check"): ["world", "check", "--json", "--no-pairs", "--images-per-class", "1", "--steps", "1"],
    ("world", "janus"): ["world", "janus", "--out", "{out}/janus-run"],
    ("world", "check-janus"): ["world", "check-janus", "--json", "--images-per-prompt", "1"],
    ("itd", "classify"): ["itd", "classify", "{run}", "-p", "circle"],
    ("bench", "eap"): ["bench", "eap", "--no-sd14", "--images-per-class", "1", "--iterations", "1"],
}
OPTIONS = sorted({o for words, info in commands() for o in typer_options(words, info)} | set(setting_options()),
                 key=lambda o: (o.command, o.flag, o.method or ""))


def stubs() -> dict[str, Callable[..., Any]]:
    """Where each command's real work starts: replaced by a function that raises ``Reached``."""

    def reached(*args: Any, **kwargs: Any) -> Any:
        raise Reached

    def load(*args: Any, **kwargs: Any) -> Any:
        from erasekit.checks import check_device

        check_device(kwargs.get("device", "cpu"))  # the one check a load makes before its minutes of work
        raise Reached

    return {"erasekit.models.load_pipeline": load} | {name: reached for name in (
        "erasekit.models.toy_pipeline", "erasekit.compare._run_isolated", "erasekit.compare._run_in_process",
        "erasekit.world.train.WorldTrainer.run", "erasekit.world.adapter.AdapterTrainer.run", "erasekit.world.check.load_toy_judge", "erasekit.bench.eap_speed",
        "erasekit.world.janus_train.JanusTrainer.run", "erasekit.world.janus_check.load_janus",
        "erasekit.eval.runner.run_suite", "erasekit.api.flush_denormals",
    )}


# ---- values ------------------------------------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)  # what a shell can pass
INTS = st.one_of(st.integers(-3, 3), st.integers(-(2**70), 2**70), st.sampled_from([2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**20]))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e30, -1e30, 0.5, 7.5]))
JUNK = st.sampled_from(["", " ", "nan", "inf", "-inf", "1e400", "1e12", "0x10", "1.5", "-", "--", "true", "五", "1_000", "3 4"])
# every place is inside the case's folder or the shared run (relative ones too: the tests run in a temporary folder), so
# that an input the checks wrongly accept cannot write anywhere else (these tests may run as root)
PLACES = st.sampled_from(["{out}", "{out}/new", "{out}/new/deeper/x", "{out}/file.txt", "{out}/x.png", "{out}/x.json", "{out}/x.safetensors",
                          "{run}", "{run}/delta.safetensors", "{run}/run.json", "{out}/file.txt/x", ".", "~", "x" * 300, "{out}/" + "y" * 300,
                          "toy", "circle"])
RELATIVE = TEXT.map(lambda text: text.lstrip("/"))


def cli_values(kind: str) -> st.SearchStrategy[str]:
    """Command-line text for an input of ``kind``: in-range, out-of-range and malformed."""
    if kind == "int":
        return st.one_of(INTS.map(str), JUNK)
    if kind == "float":
        return st.one_of(FLOATS.map(repr), INTS.map(str), JUNK)
    if kind == "bool":
        return st.one_of(st.sampled_from(["true", "false", "1", "0", "yes", "maybe"]), JUNK)
    return st.one_of(PLACES, RELATIVE, JUNK)


PY_VALUES = st.one_of(INTS, FLOATS, st.booleans(), st.none(), RELATIVE, st.lists(st.integers(), max_size=2), st.just(Path("missing/x")))


# ---- the properties' common check ----------------------------------------------------------------------------

def leftovers(folder: Path) -> list[str]:
    """What a refused command must not leave in its fresh output folder: anything at all."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def cli_failure(res: Any, out: Path, progress: bool = False) -> str | None:
    """Why a CLI result breaks the rule (None when it keeps it): exit 0, a stubbed load reached, or exit 2 with one line.

    ``progress``: a run that trained may have drawn its progress before the error; the error is then one line, the last.
    """
    if isinstance(res.exception, Reached):
        return None
    if "Traceback" in res.output:
        return f"traceback: {res.output[-600:]}"
    if res.exit_code == 0:
        temps = [p for p in leftovers(out) if p.rsplit("/", 1)[-1].startswith(".") or p.endswith((".tmp", ".partial"))]
        return f"temp files left: {temps}" if temps else None
    if res.exit_code != 2 or (res.exception is not None and not isinstance(res.exception, SystemExit)):
        return f"exit {res.exit_code}: {res.exception!r}"
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    if len(errors) != 1 or not lines[-1].startswith("error: ") or (len(lines) != 1 and not progress):
        return f"not one error line: {res.output[-600:]!r}"
    return f"left behind: {leftovers(out)}" if leftovers(out) else None


def py_failure(call: Callable[[], Any], *given: Any) -> str | None:
    """Why a Python call breaks the rule: anything but success, ``Reached`` or one ErasekitError line.

    A line break inside a ``given`` value (a path with a newline in it) may show in the message as it was given.
    """
    try:
        call()
    except Reached:
        return None
    except ErasekitError as exc:
        text = str(exc)
        for char in {c for value in given for c in str(value) if len(f"a{c}b".splitlines()) > 1}:
            text = text.replace(char, " ")  # a line break the caller put in a path, shown back to them
        return f"error of {len(text.splitlines())} lines: {exc}" if len(text.splitlines()) != 1 else None
    except Exception as exc:  # noqa: BLE001  (that is the finding)
        return f"{type(exc).__name__}: {exc}"
    return None



def fill(text: str, out: Path, run: Path) -> str:
    """``text`` with {out} and {run} replaced by the case's folder and the shared run folder."""
    return text.replace("{out}", str(out)).replace("{run}", str(run))



def json_is_finite(path: Path) -> bool:
    """Whether a JSON file parses with no NaN or infinity in it."""
    def refuse(token: str) -> Any:
        raise ValueError(token)

    try:
        json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    except ValueError:
        return False
    return True


