"""MkDocs hooks: the configuration and command-line references, generated from the code at every build.

A page asks for a generated block with an HTML comment alone on a line:

    <!-- generated: config -->       every config section and every method's fields: type, default, help
    <!-- generated: method NAME -->  the fields and default search space of one method (its page)
    <!-- generated: cli -->          `metacorrect --help` and the help of every subcommand

The config reference reads the dataclasses themselves (`metacorrect.config.ExperimentConfig` and, through
the method registry, each method's config class): field names, types and defaults come from
`dataclasses.fields`, the help of a field from the comment on its line or the comment lines right above it,
and a section's introduction from its class docstring. The CLI reference is argparse's own help of
`metacorrect.cli.build_parser()`. Nothing is copied by hand, so the pages cannot drift from the code; a
method without a page under methods/ is a broken link, which `mkdocs build --strict` refuses.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import os
import posixpath
import re
import textwrap
import tokenize
import types
import typing
from typing import Any

from mkdocs.exceptions import PluginError

MARKER = re.compile(r"^<!-- generated: ([\w-]+)(?: ([\w-]+))? -->[ \t]*$", re.M)

# Methods documented together on one page; every other method has methods/<name>.md.
METHOD_PAGES = {"erm": "baselines", "clean_only": "baselines"}


def on_page_markdown(markdown: str, page, config, files) -> str:
    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown generated block '{name}' "
                              f"(expected one of {', '.join(sorted(GENERATORS))})")
        try:
            return GENERATORS[name](page.file.src_uri, match.group(2))
        except (KeyError, TypeError, ValueError) as e:
            raise PluginError(f"{page.file.src_uri}: generated block '{match.group(0)}': {e}") from e

    return MARKER.sub(replace, markdown)


# ---- config reference -------------------------------------------------------------------------------------
def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, from the source of the class that defines each field (base classes too).

    The help of a field is the comment lines directly above it (no blank line between) followed by the
    comment at the end of its own line(s)."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        out.update(_own_field_comments(klass))
    return out


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            trailing[tok.start[0]] = _comment_text(tok.string)
    classdef = ast.parse(source).body[0]
    out: dict[str, str] = {}
    for node in classdef.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, _comment_text(lines[line - 1]))
            line -= 1
        own = [trailing[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in trailing]
        text = " ".join(part for part in above + own if part)
        if text:
            out[node.target.id] = text
    return out


def _comment_text(comment: str) -> str:
    return comment.strip().lstrip("#").strip()


def class_docstring(cls: type) -> str:
    """The docstring written in the class's source (not the signature dataclasses put in `__doc__`)."""
    try:
        node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    except (OSError, TypeError):
        return ""
    return inspect.cleandoc(ast.get_docstring(node) or "")


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {type_name(item)}"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def _cell(text: str) -> str:
    """Text for a table cell: pipes escaped, and < > & outside code spans kept as text, not HTML."""
    parts = text.replace("\n", " ").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
    return "`".join(parts)


def _anchor(dotted: str) -> str:
    return "config-" + dotted.replace(".", "-").replace("_", "-")


def fields_table(cls: type, prefix: str, skip: tuple[str, ...] = ()) -> str:
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    rows = ["| field | type | default | what it does |", "|---|---|---|---|"]
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = hints[f.name]
        dotted = f"{prefix}.{f.name}"
        if dataclasses.is_dataclass(tp):
            what = f"section: see [`{dotted}`](#{_anchor(dotted)})"
        else:
            what = helps.get(f.name, "")
        rows.append(f"| `{dotted}` | {_cell(type_name(tp))} | {_cell(default_text(f))} | {_cell(what)} |")
    return "\n".join(rows)


def _section(cls: type, dotted: str, level: int = 3) -> list[str]:
    out = [f"{'#' * level} `{dotted}` {{#{_anchor(dotted)}}}", ""]
    doc = class_docstring(cls)
    if doc:
        out += [doc, ""]
    out += [fields_table(cls, dotted), ""]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _section(hints[f.name], f"{dotted}.{f.name}", level + 1)
    return out


def method_page(name: str, from_page: str) -> str:
    target = f"methods/{METHOD_PAGES.get(name, name)}.md"
    return posixpath.relpath(target, posixpath.dirname(from_page) or ".")


def config_reference(src_uri: str, arg: str | None = None) -> str:
    from metacorrect.config import ENGINE_FIELDS, ExperimentConfig, MethodConfig
    from metacorrect.methods import METHODS

    out: list[str] = []
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "method":
            continue
        out += _section(hints[f.name], f.name, 3)

    out += [f"### `method` {{#{_anchor('method')}}}", ""]
    names = ", ".join(f"[`{n}`]({method_page(n, src_uri)})" for n in METHODS)
    default = MethodConfig().name
    out += [f"`method.name` picks the method (default `{default}`): {names}. The other fields of the section "
            "depend on it; a field another method does not have is refused. Switching methods with "
            f"`--set method.name=...` starts the new method from its own defaults, except "
            f"{', '.join(f'`{e}`' for e in ENGINE_FIELDS)}, which mean the same for every meta method.", ""]
    for name in METHODS:
        out += [f"#### `method.name: {name}` {{#{_anchor('method.' + name)}}}", "",
                f"See the method's page: [{name}]({method_page(name, src_uri)}).", "", method_reference(src_uri, name)]
    return "\n".join(out)


def method_reference(src_uri: str, name: str | None) -> str:
    """One method's config fields (`method.*`) and its default search space."""
    from metacorrect.methods import METHODS

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (expected one of {', '.join(METHODS)})")
    cls = METHODS[name].config_class
    out: list[str] = []
    if [f for f in dataclasses.fields(cls) if f.name != "name"]:
        out += [fields_table(cls, "method", skip=("name",)), ""]
    else:
        out += [f"`{name}` has no fields besides `method.name`.", ""]
    space = getattr(cls, "search_space", None)
    if space:
        out += ["Default search space of `metacorrect sweep` (`--space` replaces it):", "", "```yaml"]
        out += [f"{key}: {json.dumps(spec)}" for key, spec in space.items()]
        out += ["```", ""]
    return "\n".join(out)


# ---- CLI reference ----------------------------------------------------------------------------------------
def _subcommands(parser: argparse.ArgumentParser, path: str):
    yield path, parser
    for action in parser._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subcommands(sub, f"{path} {name}")


def cli_reference(src_uri: str, arg: str | None = None) -> str:
    from metacorrect.cli import build_parser

    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ.update(COLUMNS="100", NO_COLOR="1")  # the same wrapping on every machine, no colour codes
    try:
        out: list[str] = []
        for path, parser in _subcommands(build_parser(), "metacorrect"):
            anchor = path.replace(" ", "-")
            out += [f"## `{path}` {{#{anchor}}}", "", "```text", parser.format_help().rstrip(), "```", ""]
        return "\n".join(out)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


GENERATORS = {"config": config_reference, "method": method_reference, "cli": cli_reference}
