"""Every command that README.md and docs/*.md show is checked here, without training.

The convention the docs follow:

- Commands go in ```bash fences, one per line (a trailing backslash continues it); what they
  print goes in ```text fences, which are never run. Comments after `#` are for the reader.
- `python train.py …` (after optional `VAR=value` settings): Hydra's override parser reads the
  overrides, Hydra's compose API composes the config (with the hydra config, so that
  `hydra/launcher=…` and `hydra.*` keys count too) and equip's config checks judge it, as
  `train.py` does before any data is read. To keep this fast, compose() runs once per choice of
  config groups and the plain values are then applied the way compose() applies them last.
  A sweep (`-m`): every value of every swept key (from the command line or the
  `hydra.sweeper.params` of a `sweep=NAME` file) is composed and checked at least once, the
  other keys at their first value; a range (`interval(a, b)`) at both ends.
  Commands for what is not here (Azure, a Ray cluster, `/path/to/photos`) are composed all the
  same: composing reads no data and contacts nothing.
- `python -m equip.X …`: the module exists, answers `--help`, and its arguments parse.
- `python bench/X.py`: the script exists.
- A fence opened as ```bash run is executed as well: each command in a subprocess, in a temp
  folder, with MLFLOW_TRACKING_URI at a temp sqlite store and `TINY` added to every
  `python train.py` (keys the command sets itself are left as they are). Keep such blocks few
  and short: this whole file runs in about a minute.
- Other programs (pip, mlflow, ray, az, curl) are shown for the reader and not run.
- Every relative link (`[…](docs/x.md#anchor)`) leads to a file and a heading that exist.
- The configs tables of README.md and docs/training.md name every option a user can pick.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf

from equip.config.checks import check_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
TINY = {
    "trainer": "debug",
    "data.image_size": "32",
    "data.per_class": "10",
    "trainer.progress_bar": "false",
    "tracking.log_model": "false",
}
FENCE = re.compile(r"^```(\w*)\s*(.*)$")
ENV_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@dataclass(frozen=True)
class Command:
    """One command line of a ```bash block (continuations joined, env settings dropped)."""

    doc: str  # file:line, the test id
    words: tuple[str, ...]
    run: bool  # inside a ```bash run block

    def __str__(self) -> str:
        return self.doc


def bash_blocks(path: Path) -> Iterator[tuple[int, bool, list[str]]]:
    """(first line number, marked run, lines) of every ```bash fence."""
    fence: re.Match[str] | None = None
    start, body = 0, []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if fence is None:
            fence = FENCE.match(line.strip())
            start, body = n + 1, []
        elif line.strip() == "```":
            if fence.group(1) == "bash":
                yield start, fence.group(2).split()[:1] == ["run"], body
            fence = None
        else:
            body.append(line)


def commands(path: Path) -> Iterator[Command]:
    for start, run, body in bash_blocks(path):
        text, first = "", start
        for n, line in enumerate(body, start):
            if not text:
                first = n
            if line.rstrip().endswith("\\"):
                text += line.rstrip()[:-1] + " "
                continue
            text += line
            line_text = ENV_PREFIX.sub("", text.strip())
            text = ""
            if line_text.startswith("python "):
                words = tuple(shlex.split(line_text, comments=True))
                yield Command(f"{path.relative_to(ROOT)}:{first}", words, run)


ALL = [c for path in DOCS for c in commands(path)]
TRAIN = [c for c in ALL if c.words[1:2] == ("train.py",)]
MODULES = [c for c in ALL if c.words[1:2] == ("-m",) and c.words[2].startswith("equip")]
SCRIPTS = [c for c in ALL if c.words[1].endswith(".py") and c not in TRAIN]
RUN = [c for c in ALL if c.run]


def test_the_docs_show_commands() -> None:
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1
    assert len(TRAIN) > 20 and MODULES and RUN


# ---------------------------------------------------------------- python train.py
@pytest.fixture(scope="module")
def hydra_conf() -> Iterator[None]:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield


@functools.cache
def composed(point: tuple[str, ...]) -> DictConfig:
    return compose("train", overrides=list(point), return_hydra_config=True)


def swept_values(o: Override) -> list[str]:
    key = o.get_key_element()
    if not o.is_sweep_override():
        return [o.input_line]
    if o.is_discrete_sweep():
        return [f"{key}={v}" for v in o.sweep_string_iterator()]
    span = o.value()  # interval(a, b), perhaps inside tag(…): Optuna samples between the ends
    return [f"{key}={span.start}", f"{key}={span.end}"]


def covering_points(axes: list[list[str]]) -> list[tuple[str, ...]]:
    """Each value of each axis once, the other axes at their first value."""
    first = [axis[0] for axis in axes]
    points = [tuple(first)]
    for i, axis in enumerate(axes):
        points += [tuple(first[:i] + [value] + first[i + 1 :]) for value in axis[1:]]
    return points


def is_group(key: str) -> bool:
    """A config group (model=baseline, hydra/launcher=ray), not a value."""
    bare = key.lstrip("+~").split("@")[0]
    return "/" in bare or (ROOT / "conf" / bare).is_dir()


def configured(parser: OverridesParser, point: list[str]) -> DictConfig:
    """compose(point), in its two steps: the config groups pick the files (composed once per
    choice of groups), then the values are applied in order, as compose() applies them last."""
    overrides = parser.parse_overrides(point)
    groups = tuple(o.input_line for o in overrides if is_group(o.get_key_element()))
    cfg = copy.deepcopy(composed(groups))
    values = [o for o in overrides if not is_group(o.get_key_element())]
    ConfigLoaderImpl._apply_overrides_to_config(values, cfg)
    return cfg


def train_configs(args: list[str]) -> Iterator[DictConfig]:
    """The composed config of every job to check, for a single run or a sweep."""
    parser = OverridesParser.create()
    overrides = parser.parse_overrides(args)
    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    params = configured(parser, fixed).hydra.sweeper.get("params") or {}
    named = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    # as in Hydra's sweepers, the command line wins over the sweep file for the same key
    axes = {o.get_key_element(): swept_values(o) for o in [*named, *overrides]}
    for point in covering_points(list(axes.values())):
        yield configured(parser, list(point))


@pytest.mark.parametrize("command", TRAIN, ids=str)
def test_train_command_composes_and_passes_the_checks(hydra_conf: None, command: Command) -> None:
    args = [w for w in command.words[2:] if w not in ("-m", "--multirun")]
    if args == ["--help"]:
        return
    for cfg in train_configs(args):
        check_config(cfg)


# ---------------------------------------------------------------- python -m equip.X
class Parsed(Exception):
    """Raised in place of running a command once argparse has accepted its arguments."""


def answer(main: Any, argv: list[str]) -> tuple[Any, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, out.getvalue()


@pytest.mark.parametrize("command", MODULES, ids=str)
def test_module_command_exists_and_parses(
    command: Command, monkeypatch: pytest.MonkeyPatch
) -> None:
    name, args = command.words[2], list(command.words[3:])
    assert name.startswith("equip.") and importlib.util.find_spec(name), f"no module {name}"
    main = importlib.import_module(name).main
    code, text = answer(main, ["--help"])
    assert code in (0, None) and text.strip(), f"python -m {name} --help: exit {code}"
    defaults = getattr(inspect.getmodule(main), "DEFAULTS", None)
    if defaults is not None:  # key=value options, an OmegaConf dotlist
        unknown = set(OmegaConf.from_dotlist(args)) - set(defaults)
        assert not unknown, f"python -m {name} has no option {sorted(unknown)}"
        return
    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(self: argparse.ArgumentParser, *a: Any, **kw: Any) -> None:
        raise Parsed(parse_args(self, *a, **kw))  # bad arguments exit 2 before this

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        main(args)


@pytest.mark.parametrize("command", SCRIPTS, ids=str)
def test_script_exists(command: Command) -> None:
    assert (ROOT / command.words[1]).is_file(), f"no script {command.words[1]}"


# ---------------------------------------------------------------- ```bash run blocks
def tiny(words: tuple[str, ...]) -> list[str]:
    """The command as a subprocess runs it: this checkout's train.py, TINY added."""
    if words[1:2] != ("train.py",):
        return [sys.executable, *words[1:]]
    given = {w.split("=", 1)[0].lstrip("+~") for w in words[2:]}
    extra = [f"{k}={v}" for k, v in TINY.items() if k not in given]
    return [sys.executable, str(ROOT / "train.py"), *words[2:], *extra]


def test_run_blocks_run(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    for command in RUN:
        argv = tiny(command.words)
        done = subprocess.run(
            argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{command}: {shlex.join(argv)}\n{done.stderr[-3000:]}"


# ---------------------------------------------------------------- links
def slugs(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    headings = re.findall(r"^#+\s+(.*)$", path.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_lead_somewhere(doc: Path) -> None:
    broken = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists() or (anchor and path.suffix == ".md" and anchor not in slugs(path)):
            broken.append(target)
    assert broken == [], f"{doc.name}: broken links {broken}"


# ---------------------------------------------------------------- the configs table
@pytest.mark.parametrize("doc", [ROOT / "README.md", ROOT / "docs" / "training.md"], ids=str)
def test_the_configs_table_names_every_option(doc: Path) -> None:
    """`| \\`group\\` | \\`option\\`, … |` rows: every YAML option a user can pick is there."""
    from tests.test_config import options

    rows = dict(re.findall(r"^\| `([\w/+]+)` \|([^|]*)\|", doc.read_text(), flags=re.MULTILINE))
    missing = []
    for option in options():
        group, choice = option.lstrip("+").split("=")
        if f"`{choice}`" not in rows.get(group, ""):
            missing.append(option)
    assert missing == [], f"{doc.name}: the configs table lacks {missing}"
