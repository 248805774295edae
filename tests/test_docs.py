"""The documentation says what the code does: README.md and docs/*.md are read, and what they name is
checked against the code itself.

- every relative link and ``#anchor`` resolves (GitHub's heading anchors);
- every option a page names (``--a.b``, ``a.b`` of a CLI section, a command line of a code block, a key
  of a ``yaml`` block) exists in the parser the CLI builds for that subcommand and method;
- every ``configs/...`` path a page names exists, and every compare file in configs/compare/ loads with
  options the fit parser knows (configs/*.yaml and configs/strategy/ parse in test_cli.py and
  test_strategies.py);
- every metric name docs/metrics.md writes is one the code logs, and every name the code logs is there.

A failure names the page and line.
"""

from __future__ import annotations

import argparse
import ast
import collections.abc
import dataclasses
import functools
import importlib
import inspect
import itertools
import re
import shlex
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import yaml

from ipo_lightning.analysis.budget import check_budget
from ipo_lightning.analysis.compare import FILE_KEYS, MEMBER_FIT_CONFIG, load_spec
from ipo_lightning.analysis.study import AXES
from ipo_lightning.callbacks.divergence_monitor import PREFIX as DIVERGENCE_PREFIX
from ipo_lightning.callbacks.generation_eval import PREFIX as GENERATION_PREFIX
from ipo_lightning.callbacks.performance import PEAK_MEMORY, STEP_TIME
from ipo_lightning.cli import TOOLS, PreferenceCLI
from ipo_lightning.divergence.measure import BatchResult, Share, TokenMean, merge_shares
from ipo_lightning.divergence.sampling import SequenceSample
from ipo_lightning.divergence.token_kl import TokenDivergence
from ipo_lightning.evaluation import KL
from ipo_lightning.generation_metrics import set_metrics
from ipo_lightning.methods import METHODS, method_from_argv
from ipo_lightning.metrics import metric_names
from ipo_lightning.resume import RENAMED_OPTIONS
from ipo_lightning.reward_model import METRIC_NAMES as REWARD_MODEL_METRICS
from ipo_lightning.rl.module import ROLLOUT_METRICS, OnPolicyModule
from tests.helpers import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LIGHTNING_SUBCOMMANDS = tuple(PreferenceCLI.subcommands())
SPLITS = ("train/", "val/", "test/")


# --- Reading Markdown -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """A fenced code block: its info string, first content line (1-based) and lines."""

    lang: str
    line: int
    lines: list[str]


@dataclass(frozen=True)
class Page:
    """A Markdown page: its prose lines (code blocks blanked, so line numbers hold) and code blocks."""

    path: Path
    prose: list[str]
    blocks: list[Block]

    def where(self, line: int) -> str:
        """``file:line`` of a 1-based line, relative to the repository."""
        return f"{self.path.relative_to(REPO)}:{line}"

    def spans(self) -> Iterator[tuple[int, str]]:
        """(line, text) of every inline code span of the prose."""
        for number, text in enumerate(self.prose, start=1):
            for match in re.finditer(r"(`+)(.+?)\1", text):
                yield number, match.group(2).strip()


@functools.cache
def read_page(path: Path) -> Page:
    """Split ``path`` into prose and fenced code blocks."""
    prose: list[str] = []
    blocks: list[Block] = []
    fence: re.Match[str] | None = None
    current: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        opening = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence is None and opening:
            fence, current, start = opening, [], number + 1
            prose.append("")
        elif fence is not None and line.strip().startswith(fence.group(1)) and not line.strip()[3:].strip():
            blocks.append(Block(fence.group(2).lower(), start, current))
            fence = None
            prose.append("")
        elif fence is not None:
            current.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert fence is None, f"{path.relative_to(REPO)}:{start - 1}: code block never closed"
    return Page(path, prose, blocks)


def without_code_spans(text: str) -> str:
    """``text`` with inline code spans blanked (a link inside backticks is no link)."""
    return re.sub(r"(`+).+?\1", lambda match: " " * len(match.group(0)), text)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: its rendered text lowercased, punctuation dropped (``-`` and
    ``_`` kept), spaces to ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = "".join(char for char in text if char.isalnum() or char in " -_")
    return text.replace(" ", "-")


@functools.cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of page ``path``; repeated headings get ``-1``, ``-2``... as on GitHub."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for line in read_page(path).prose:
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        anchor = github_anchor(match.group(1))
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        found.add(anchor if count == 0 else f"{anchor}-{count}")
    return frozenset(found)


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)")


def links(page: Page) -> Iterator[tuple[int, str]]:
    """(line, target) of every inline and reference-style link and image of the prose."""
    for number, line in enumerate(page.prose, start=1):
        text = without_code_spans(line)
        for match in LINK.finditer(text):
            yield number, match.group(1)
        if match := REFERENCE_LINK.match(text):
            yield number, match.group(1)


# --- The parsers the CLI builds ---------------------------------------------------------------------


class _ParserBuilt(Exception):
    """Carries a parser out of the call that built it, before it parses anything."""


class _ParserOnly(PreferenceCLI):
    """The CLI up to its parser: everything :class:`PreferenceCLI` adds, nothing parsed or built."""

    def parse_arguments(self, parser: Any, args: Any) -> None:
        raise _ParserBuilt(parser)


@functools.cache
def lightning_parser(method: str, subcommand: str | None) -> argparse.ArgumentParser:
    """The CLI's parser for ``method``: ``subcommand``'s (``fit``...), or the top-level one for None."""
    try:
        _ParserOnly(args=[], method=method)
    except _ParserBuilt as built:
        parser = built.args[0]
    if subcommand is not None:
        parser = parser._subcommands_action._name_parser_map[subcommand]
    return parser


@functools.cache
def lightning_actions(method: str, subcommand: str | None) -> Mapping[str, argparse.Action]:
    """Option name (without ``--``) -> action of :func:`lightning_parser`."""
    return {
        string[2:]: action
        for action in lightning_parser(method, subcommand)._actions
        for string in action.option_strings
        if string.startswith("--")
    }


@functools.cache
def tool_options(tool: str) -> frozenset[str]:
    """The option strings of a tool subcommand's own parser (``compare``, ``report``...), read from
    the parser its ``main`` builds, stopped before it parses."""
    main = importlib.import_module(f"ipo_lightning.analysis.{tool}").main

    def stop(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        raise _ParserBuilt(self)

    with patch.object(argparse.ArgumentParser, "parse_args", stop):
        try:
            main([])
        except _ParserBuilt as built:
            parser = built.args[0]
    return frozenset(string for action in parser._actions for string in action.option_strings)


def _classes(hint: Any) -> list[type]:
    """The classes a type hint allows (Optional and unions unwrapped), without builtins."""
    if isinstance(hint, type):
        return [] if hint.__module__ == "builtins" else [hint]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [cls for arg in typing.get_args(hint) for cls in _classes(arg)]
    return []


def _is_open(hint: Any) -> bool:
    """Whether keys below an option of this hint are free: a mapping, a callable or a subclass choice
    (``class_path`` / ``init_args``), or untyped."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_open(arg) for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint) or hint
    return hint is Any or origin in (dict, Mapping, typing.Callable, collections.abc.Callable)


def _parameters(cls: type) -> dict[str, Any]:
    """Argument name -> annotation of a class (a dataclass's fields, else its ``__init__``)."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}
    try:
        signature = inspect.signature(cls)
        hints = typing.get_type_hints(cls.__init__)
    except (TypeError, ValueError, NameError):
        return {}
    return {name: hints.get(name, Any) for name in signature.parameters}


def _below(hint: Any, rest: list[str]) -> bool:
    """Whether ``rest`` (dotted parts) names something inside a value of type ``hint``."""
    if not rest or _is_open(hint):
        return True
    if rest[0] in ("class_path", "init_args", "help"):
        return True
    for cls in _classes(hint):
        parameters = _parameters(cls)
        if rest[0] in parameters and _below(parameters[rest[0]], rest[1:]):
            return True
    return False


def option_exists(actions: Mapping[str, argparse.Action], name: str) -> bool:
    """Whether dotted option ``name`` (``*`` for "any option below") is one of ``actions`` or names a
    field inside one (``model.lora.rank``, ``data.train.path``, ``model.optimizer.init_args.lr``)."""
    name = name.removesuffix("+")  # jsonargparse's append form, ``--trainer.callbacks+=``
    if name.endswith(".*"):
        group = name[:-2]
        return any(option.startswith(group + ".") for option in actions)
    if name in actions:
        return True
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        action = actions.get(".".join(parts[:cut]))
        if action is not None and hasattr(action, "_typehint"):  # a typed value, not a section
            return _below(action._typehint, parts[cut:])
    return False


def fit_option_methods(name: str, subcommand: str = "fit") -> list[str]:
    """The methods whose ``subcommand`` parser has option ``name``."""
    return [method for method in METHODS if option_exists(lightning_actions(method, subcommand), name)]


@functools.cache
def linked_targets() -> frozenset[str]:
    """Options the CLI sets from another one (``data.tokenizer_name_or_path`` from the model's): no
    command-line options of their own, but their names may be written in prose."""
    return frozenset(
        action.dest
        for method in METHODS
        for action in lightning_parser(method, "fit")._actions
        if type(action).__name__ == "ActionLink"
    )


def prose_option_known(name: str) -> bool:
    """Whether prose may name ``name``: an option of some method's fit, an option the CLI links to
    another, or an old name the CLI still reads (``RENAMED_OPTIONS``) whose new name exists."""
    renamed = RENAMED_OPTIONS.get(name)
    return (
        bool(fit_option_methods(name))
        or name in linked_targets()
        or (renamed is not None and bool(fit_option_methods(renamed)))
    )


@functools.cache
def sections() -> frozenset[str]:
    """The fit parser's sections (``model``, ``trainer``, ``generation``...) in any method."""
    return frozenset(
        option
        for method in METHODS
        for option, action in lightning_actions(method, "fit").items()
        if "." not in option and type(action).__name__ == "_ActionConfigLoad"
    )


# --- Command lines ------------------------------------------------------------------------------------


def commands(text: str) -> Iterator[list[str]]:
    """The argument lists after ``python -m ipo_lightning`` / ``ipo-lightning`` in shell ``text``."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:
        return
    pieces = [
        list(group)
        for separator, group in itertools.groupby(tokens, lambda t: t in ("|", "||", "&&", ";", "&"))
        if not separator
    ]
    for piece in pieces:
        for index, token in enumerate(piece):
            if token == "ipo_lightning" and index > 0 and piece[index - 1] == "-m":
                yield piece[index + 1 :]
                break
            if token == "ipo-lightning" or token.endswith("/ipo-lightning"):
                yield piece[index + 1 :]
                break


def shell_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line, command) of a shell block, continuation lines joined."""
    pending, first = "", 0
    for offset, line in enumerate(block.lines):
        if not pending:
            first = block.line + offset
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def command_problems(args: list[str]) -> list[str]:
    """What is wrong with one ``ipo_lightning`` command line: an unknown subcommand or option."""
    if not args or args[0].startswith("-"):
        subcommand, rest = None, args
    else:
        subcommand, rest = args[0], args[1:]
    if subcommand is not None and subcommand not in (*LIGHTNING_SUBCOMMANDS, *TOOLS):
        if re.fullmatch(r"[a-z_]+", subcommand):
            return [f"unknown subcommand {subcommand!r}"]
        return []  # a placeholder such as <subcommand>
    options = [arg.split("=", 1)[0] for arg in rest if arg.startswith("--")]
    if subcommand in TOOLS:
        known = tool_options(subcommand)
        return [f"{subcommand} has no option {option}" for option in options if option not in known]
    resolved = [str(REPO / arg) if (REPO / arg).is_file() else arg for arg in rest]
    method = method_from_argv(resolved)
    actions = lightning_actions(method, subcommand)
    where = f"{subcommand or 'the top-level parser'} (method {method})"
    return [f"{where} has no option {option}" for option in options if not option_exists(actions, option[2:])]


# --- YAML blocks --------------------------------------------------------------------------------------


def dotted(mapping: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    """Every leaf key of a nested mapping as a dotted name (a key holding a mapping is descended)."""
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not {"class_path", "init_args"} & set(value):
            yield from dotted(value, name + ".")
        else:
            yield name


def _config_method(configs: Any) -> str:
    """The method a member's fit config file(s) select (``preference`` when they name none)."""
    files = configs if isinstance(configs, list) else [configs]
    return method_from_argv([arg for file in files for arg in ("--config", str(REPO / str(file)))])


def fit_config_problems(config: Mapping[str, Any]) -> list[str]:
    """Keys of a fit config that its method's fit parser does not have."""
    actions = lightning_actions(str(config.get("method", "preference")), "fit")
    return [f"no fit option {key}" for key in dotted(config) if not option_exists(actions, key)]


def compare_problems(spec: Mapping[str, Any], default_methods: list[str] | None = None) -> list[str]:
    """What a compare file (or a fragment of one) names that compare or the fit parser does not have.

    A member's options are checked against its own fit config's method; without one, against the
    compare file's ``fit_config`` (a fragment without it: any method)."""
    problems = [
        f"compare file key {key!r} is not one of {sorted(FILE_KEYS)}" for key in spec if key not in FILE_KEYS
    ]
    if spec.get("fit_config"):
        default_methods = [_config_method(spec["fit_config"])]
    methods = default_methods or list(METHODS)
    problems += [
        f"study axis {axis!r} is not one of {sorted(AXES)}"
        for axis in spec.get("study") or {}
        if axis not in AXES
    ]
    if spec.get("budget") is not None:
        try:
            check_budget(Path("<doc>"), spec["budget"])
        except Exception as error:  # noqa: BLE001 - any refusal is the finding
            problems.append(str(error))
    groups = [("options", spec.get("options") or {}, methods)]
    for member, options in (spec.get("members") or {}).items():
        options = dict(options or {})
        own = options.pop(MEMBER_FIT_CONFIG, None)
        groups.append((f"member {member!r}", options, [_config_method(own)] if own else methods))
    for label, options, member_methods in groups:
        for key in dotted(options):
            if key == "config":
                continue
            if not any(option_exists(lightning_actions(m, "fit"), key) for m in member_methods):
                problems.append(f"{label}: no fit option {key} (method {', '.join(member_methods)})")
    return problems


def yaml_problems(text: str) -> list[str]:
    """What is wrong with a ``yaml`` block that is a fit config or a compare file (or a part of one);
    a block that is neither (a W&B sweep, a data record) is left alone."""
    loaded = yaml.safe_load(text)
    if not isinstance(loaded, Mapping) or not loaded:
        return []
    keys = set(loaded)
    fit_top = {option for option in lightning_actions("preference", "fit") if "." not in option}
    if keys <= FILE_KEYS:
        return compare_problems(loaded)
    if keys & (sections() | {"seed_everything", "method"}):
        unknown = sorted(keys - fit_top - sections())
        problems = [f"unknown top-level fit key(s) {unknown}"] if unknown else []
        return problems + fit_config_problems(loaded)
    return []


# --- Metric names -------------------------------------------------------------------------------------


@functools.cache
def _loggable_metrics() -> frozenset[str]:
    return frozenset(_collect_metrics())


def loggable_metrics() -> set[str]:
    """Every metric name the code logs (see :func:`_collect_metrics`)."""
    return set(_loggable_metrics())


def _collect_metrics() -> set[str]:
    """Every metric name the code logs, as docs/metrics.md writes it: the module's own metrics without
    their ``train/``/``val/`` prefix, the callbacks' with theirs (``divergence/``, ``gen/``, ``perf/``)."""
    names: set[str] = set()
    for method in METHODS:
        module = METHODS[method].module_class
        if issubclass(module, OnPolicyModule):
            names |= {*ROLLOUT_METRICS, "loss", *module.method_metrics}
    names |= {*metric_names("ipo"), *metric_names("dpo"), *REWARD_MODEL_METRICS}
    # The divergence monitor's names, from the code that merges a measurement (every part present).
    share = Share(
        batches={0: BatchResult(TokenDivergence(1.0, 1.0, 1.0, 1), [0.5], [0.1], TokenMean(1.0, 1))},
        texts={0: TokenMean(1.0, 1)},
        policy_samples=[SequenceSample(0, _ids(2), _ids(3), 0.5), SequenceSample(1, _ids(2), _ids(3), 0.7)],
    )
    names |= {DIVERGENCE_PREFIX + name for name in merge_shares([share]).metrics}
    # The generation evaluation's names, from the code that computes a set's metrics (greedy on).
    generated = set_metrics(
        [1.0, 0.0], [0.5, 0.5], [[1, 2], [3, 4]], [2, 2], [True, False], [1.0, 0.0], samples_per_prompt=1
    )
    names |= {GENERATION_PREFIX + name for name in [*generated, KL]}
    return names | {STEP_TIME, PEAK_MEMORY}


def _ids(length: int) -> Any:
    import torch

    return torch.arange(length)


def expand_braces(text: str) -> list[str]:
    """``a/{b,c}_{d,e}`` -> ``a/b_d``, ``a/b_e``, ``a/c_d``, ``a/c_e``."""
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [
        expanded
        for choice in match.group(1).split(",")
        for expanded in expand_braces(text[: match.start()] + choice + text[match.end() :])
    ]


def metric_form(name: str) -> str:
    """A written metric name as :func:`loggable_metrics` has it: split prefix and set name dropped."""
    for split in SPLITS:
        name = name.removeprefix(split)
    return re.sub(r"^((?:gen|divergence)/)?<[^>]+>/", r"\1", name)


def written_metrics(page: Page) -> Iterator[tuple[int, str]]:
    """(line, name) of every metric name the page writes: a table's first column, and every code span
    shaped like a metric (``group/name``, not a path or a prefix alone)."""
    for number, line in enumerate(page.prose, start=1):
        cells = line.split("|")
        if line.lstrip().startswith("|") and len(cells) > 2:
            for span in re.findall(r"`([^`]+)`", cells[1]):
                for name in expand_braces(span):
                    yield number, name
            spans = re.findall(r"`([^`]+)`", "|".join(cells[2:]))
        else:
            spans = re.findall(r"`([^`]+)`", line)
        for span in spans:
            if re.fullmatch(r"[a-z][a-z0-9_]*(/[a-z0-9_{},<>]+)+", span) and not span.endswith("/"):
                for name in expand_braces(span):
                    yield number, name


# --- The tests ----------------------------------------------------------------------------------------


def _ids_of(paths: list[Path]) -> list[str]:
    return [str(path.relative_to(REPO)) for path in paths]


@pytest.mark.parametrize("path", PAGES, ids=_ids_of(PAGES))
def test_links_and_anchors_resolve(path: Path) -> None:
    page = read_page(path)
    broken = []
    for line, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{page.where(line)}: {target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{page.where(line)}: {target}: no heading with anchor #{anchor} in {linked.name}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("path", PAGES, ids=_ids_of(PAGES))
def test_named_options_exist(path: Path) -> None:
    """Options in commands are checked for their subcommand and method; an option named in prose must
    exist in some method's fit parser."""
    page = read_page(path)
    problems = []
    for block in page.blocks:
        if block.lang in ("bash", "sh", "shell", "console", ""):
            for line, text in shell_lines(block):
                for args in commands(text):
                    problems += [f"{page.where(line)}: {problem}" for problem in command_problems(args)]
        elif block.lang in ("yaml", "yml"):
            problems += [f"{page.where(block.line)}: {p}" for p in yaml_problems("\n".join(block.lines))]
    for line, span in page.spans():
        found = list(commands(span))
        for args in found:
            problems += [f"{page.where(line)}: `{span}`: {problem}" for problem in command_problems(args)]
        if found:
            continue
        for option in re.findall(r"(?<![\w.-])--([a-z_]+(?:\.[\w*+]+)+)", span):
            if not prose_option_known(option):
                problems.append(f"{page.where(line)}: `{span}`: no option --{option} in any method's fit")
        bare = re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9*]+)+)(?:\s*[:=]\s*\S.*|\s+\S+)?", span)
        if bare and bare.group(1).split(".")[0] in sections() and not prose_option_known(bare.group(1)):
            problems.append(f"{page.where(line)}: `{span}`: no option {bare.group(1)} in any method's fit")
    assert not problems, "\n".join(problems)


REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:configs|tests|scripts|benchmarks|ipo_lightning)/(?:[\w./-]|\{[\w.,/-]*\})+)(?![<\w])"
)
"""A path into the repository as pages write it, ``{a,b}`` alternatives included (a path continued by a
``<placeholder>`` is cut before it)."""


@pytest.mark.parametrize("path", PAGES, ids=_ids_of(PAGES))
def test_named_repo_files_exist(path: Path) -> None:
    """Every ``configs/...``, ``tests/...``, ``scripts/...``, ``benchmarks/...`` or ``ipo_lightning/...``
    path the page names, in prose or code, exists."""
    page = read_page(path)
    text = path.read_text(encoding="utf-8").splitlines()
    missing = [
        f"{page.where(line)}: {name}: no such file or folder"
        for line, content in enumerate(text, start=1)
        for written in REPO_PATH.findall(content)
        for name in expand_braces(written.rstrip("."))
        if not (REPO / name).exists()
    ]
    assert not missing, "\n".join(missing)


STATED_DEFAULT = re.compile(
    r"`(?:--)?([a-z_]+(?:\.[a-z_0-9]+)+)`(?:,\s+|\s+\((?:default:?\s+)?)(-?[0-9][0-9.e-]*|true|false|null)(?=[,;)])"
)
"""An option followed by its default as pages write it: ```divergence.num_pairs` (64)``,
```model.warmup_ratio` (default 0.1)``, ```divergence.max_new_tokens`, 64)``."""


@pytest.mark.parametrize("path", PAGES, ids=_ids_of(PAGES))
def test_stated_defaults_are_the_parsers(path: Path) -> None:
    """A default a page states beside an option is that option's default in some method's fit parser."""
    page = read_page(path)
    wrong = []
    for line, text in enumerate(page.prose, start=1):
        for option, written in STATED_DEFAULT.findall(text):
            if option.split(".")[0] not in sections():
                continue
            value = yaml.safe_load(written)
            value = float(value) if isinstance(value, str) else value  # YAML 1.1 reads 1e-6 as a string
            found = {method: lightning_parser(method, "fit").get_defaults().get(option) for method in METHODS}
            if value not in found.values():
                wrong.append(f"{page.where(line)}: {option} ({written}): the default is {found}")
    assert not wrong, "\n".join(wrong)


def resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` is an importable module, or an attribute path inside one."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if not hasattr(found, attribute):
                return False
            found = getattr(found, attribute)
        return True
    return False


@pytest.mark.parametrize("path", PAGES, ids=_ids_of(PAGES))
def test_named_python_objects_exist(path: Path) -> None:
    """Every ``ipo_lightning.x.y`` / ``tests.x.y`` a code span names, and every ``from ipo_lightning...
    import`` of a ``python`` block, resolves (a file such as ``ipo_lightning.json`` aside)."""
    page = read_page(path)
    named = [
        (line, reference)
        for line, span in page.spans()
        for reference in re.findall(r"(?<![\w.])((?:ipo_lightning|tests)(?:\.\w+)+)", span)
        if not re.search(r"\.(json|jsonl|ya?ml|py|md|txt)$", reference)
    ]
    for block in page.blocks:
        if block.lang == "python":
            for node in ast.walk(ast.parse("\n".join(block.lines))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ipo_lightning"):
                    named += [
                        (block.line + node.lineno - 1, f"{node.module}.{alias.name}") for alias in node.names
                    ]
    missing = [
        f"{page.where(line)}: {reference}: no such module or attribute"
        for line, reference in named
        if not resolves(reference)
    ]
    assert not missing, "\n".join(missing)


COMPARE_FILES = sorted((REPO / "configs" / "compare").glob("*.yaml"))


@pytest.mark.parametrize("path", COMPARE_FILES, ids=_ids_of(COMPARE_FILES))
def test_shipped_compare_files_load(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compare file loads, and every option it gives its members is one of their fit parser's."""
    monkeypatch.chdir(REPO)  # its paths are relative to the repository root, where users run it
    spec = load_spec(path.relative_to(REPO))
    assert spec.members
    problems = compare_problems(yaml.safe_load(path.read_text(encoding="utf-8")))
    assert not problems, "\n".join(f"{path.relative_to(REPO)}: {p}" for p in problems)


ALL_CONFIGS = sorted(path for path in (REPO / "configs").rglob("*.yaml"))


def test_every_config_is_in_the_configs_table() -> None:
    """docs/running.md's table of the shipped configs names every file in configs/ (``{a,b}`` spelled
    out), and nothing that is not there."""
    page = read_page(REPO / "docs" / "running.md")
    listed: dict[str, int] = {}
    for line, text in enumerate(page.prose, start=1):
        cells = text.split("|")
        if text.lstrip().startswith("|") and len(cells) > 2:
            for span in re.findall(r"`([^`]+\.yaml)`", cells[1]):
                for name in expand_braces(span):
                    listed.setdefault(name, line)
    shipped = {str(path.relative_to(REPO / "configs")) for path in ALL_CONFIGS}
    missing = sorted(shipped - set(listed))
    extra = [
        f"{page.where(line)}: {name}: no such file in configs/"
        for name, line in listed.items()
        if name not in shipped
    ]
    assert not extra, "\n".join(extra)
    assert not missing, f"{page.where(min(listed.values()))}: the configs table leaves out {missing}"


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=_ids_of(ALL_CONFIGS))
def test_commands_in_config_comments(path: Path) -> None:
    """The commands a config's comments give (``# python -m ipo_lightning fit --config ...``) name
    options their subcommand has, and config files that exist."""
    problems = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        comment = line.lstrip()
        if not comment.startswith("#"):
            continue
        text = comment.lstrip("#").strip()
        where = f"{path.relative_to(REPO)}:{number}"
        problems += [
            f"{where}: {name}: no such file"
            for name in re.findall(r"(?<![\w/.-])(configs/[\w./-]+\.ya?ml)", text)
            if not (REPO / name).is_file()
        ]
        for args in commands(text):
            problems += [f"{where}: {problem}" for problem in command_problems(args)]
    assert not problems, "\n".join(problems)


def test_metric_names_are_the_logged_ones() -> None:
    page = read_page(REPO / "docs" / "metrics.md")
    logged = loggable_metrics()
    written: dict[str, int] = {}
    unknown = []
    for line, name in written_metrics(page):
        form = metric_form(name)
        written.setdefault(form, line)
        if form not in logged:
            unknown.append(f"{page.where(line)}: `{name}` is not a metric the code logs")
    spans = {metric_form(name) for _, span in page.spans() for name in expand_braces(span)}
    undocumented = sorted(name for name in logged if name not in spans)
    assert not unknown, "\n".join(unknown)
    assert not undocumented, f"{page.where(1)}: logged but not documented: {undocumented}"


SAMPLE_TABLES = frozenset({DIVERGENCE_PREFIX + "samples", GENERATION_PREFIX + "samples"})
"""The W&B tables of samples the divergence monitor and the generation evaluation log (``PREFIX +
"samples"`` in both): named like metrics, but tables."""


def is_logged(name: str, logged: set[str]) -> bool:
    """Whether a full metric name as a page writes it (``val/in_dist/rewards/accuracy``,
    ``gen/ood/reward``) is one the code logs: as written, or with its set name dropped."""
    if metric_form(name) in logged or name in SAMPLE_TABLES:
        return True
    with_set = re.match(r"^(train/|val/|test/|gen/|divergence/)([a-z_0-9]+)/(.+)$", name)
    return bool(with_set) and metric_form(with_set.group(1) + with_set.group(3)) in logged


@pytest.mark.parametrize("path", PAGES, ids=_ids_of(PAGES))
def test_metric_names_on_every_page_are_logged(path: Path) -> None:
    """A full metric name in a code span of any page (``train/``, ``val/``, ``gen/``, ``divergence/``,
    ``perf/``...; wildcards and ``<placeholders>`` aside) is one the code logs."""
    page = read_page(path)
    logged = loggable_metrics()
    full = r"(train|val|test|gen|divergence|perf|rm|rloo|online)/[a-z0-9_{},/]+"
    unknown = [
        f"{page.where(line)}: `{name}` is not a metric the code logs"
        for line, span in page.spans()
        if re.fullmatch(full, span) and not span.endswith("/")
        for name in expand_braces(span)
        if not is_logged(name, logged)
    ]
    assert not unknown, "\n".join(unknown)


# --- The checks themselves ----------------------------------------------------------------------------


def test_github_anchors() -> None:
    assert (
        github_anchor("IPO, DPO, RLOO and online IPO on one budget")
        == "ipo-dpo-rloo-and-online-ipo-on-one-budget"
    )
    assert github_anchor("`model.batching`: the log-prob kernel") == "modelbatching-the-log-prob-kernel"
    assert github_anchor("Study: IPO vs DPO over data size, label noise and seeds") == (
        "study-ipo-vs-dpo-over-data-size-label-noise-and-seeds"
    )


def test_option_checks_refuse_what_is_not_there() -> None:
    fit = lightning_actions("preference", "fit")
    assert option_exists(fit, "model.beta") and option_exists(fit, "model.lora.rank")
    assert option_exists(fit, "data.train.path") and option_exists(fit, "model.optimizer.init_args.lr")
    assert option_exists(fit, "generation.*")
    assert not option_exists(fit, "model.betta") and not option_exists(fit, "model.lora.rnak")
    assert not option_exists(fit, "data.train.pth") and not option_exists(fit, "generatio.*")
    assert fit_option_methods("model.reward") == ["rloo", "online"]
    assert command_problems(["fit", "--config", "configs/quickstart.yaml", "--model.reward", "x"]) == [
        "fit (method preference) has no option --model.reward"
    ]
    assert command_problems(["fit", "--config", "configs/gold-rloo.yaml", "--model.reward", "x"]) == []
    assert command_problems(["compare", "--config", "x.yaml", "--job", "2"]) == [
        "compare has no option --job"
    ]
    assert command_problems(["evalute", "runs/x"]) == ["unknown subcommand 'evalute'"]
    assert yaml_problems("model:\n  lora:\n    rnak: 4\n") == ["no fit option model.lora.rnak"]
    assert yaml_problems("members:\n  a: {model.bta: 1}\n") == [
        f"member 'a': no fit option model.bta (method {', '.join(METHODS)})"
    ]
    assert yaml_problems("study:\n  noise: [0]\n") == [f"study axis 'noise' is not one of {sorted(AXES)}"]


def test_metric_check_reads_names_as_written() -> None:
    assert expand_braces("divergence/logratio/{chosen,margin}_{mean,std}") == [
        "divergence/logratio/chosen_mean",
        "divergence/logratio/chosen_std",
        "divergence/logratio/margin_mean",
        "divergence/logratio/margin_std",
    ]
    assert metric_form("val/ood/rewards/accuracy") == "ood/rewards/accuracy"  # a set name is not stripped
    assert metric_form("val/rewards/accuracy") == "rewards/accuracy"
    assert metric_form("gen/<set>/reward") == "gen/reward"
    logged = loggable_metrics()
    assert {"ipo/target_gap", "divergence/seq_kl_stderr", "gen/greedy_reward", "perf/step_time"} <= logged
    assert "divergence/kl_forward" not in logged
    assert is_logged("val/in_dist/rewards/accuracy", logged) and is_logged("gen/ood/win_rate", logged)
    assert not is_logged("val/in_dist/rewards/acc", logged) and not is_logged("gen/ood/winrate", logged)
