"""The docs site builds with warnings as errors, and its generated references match the code.

`mkdocs build --strict` fails on any warning: a broken link or anchor, a page missing from the nav, a
`:::` reference to a function that was renamed or moved, a method without its page. The build runs in a
subprocess into a temporary directory (nothing is written to the checkout's site/), offline.
"""
from __future__ import annotations

import dataclasses
import html
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    warnings = [line for line in log.splitlines() if line.startswith(("WARNING", "ERROR"))]
    assert not warnings, "\n".join(warnings)
    return out


def page_text(site: Path, page: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", (site / page / "index.html").read_text()))


def test_strict_build(site):
    for page in ("getting-started", "configuration", "cli", "api", "data", "runs", "sweeps", "cluster",
                 "engine", "benchmarks", "benchmark-suites", "methods/mlc"):
        assert (site / page / "index.html").is_file(), page


def test_config_reference_lists_every_field_and_default(site):
    from metacorrect.config import ExperimentConfig
    from metacorrect.methods import METHODS

    text = page_text(site, "configuration")

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            dotted = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], dotted)
            else:
                yield dotted

    fields = [d for d in walk(ExperimentConfig, "") if not d.startswith("method.")]
    assert "data.prepare.noise" in fields and "resources.cpus_per_worker" in fields
    for dotted in fields:
        assert dotted in text, dotted
    for name, method in METHODS.items():
        assert f"method.name: {name}" in text, name
        for f in dataclasses.fields(method.config_class):
            if f.name != "name":
                assert f"method.{f.name}" in text, (name, f.name)
    # a default and a help text straight from the code
    assert "train.checkpoint_every" in text and "Steps between checkpoints inside an epoch" in text


def test_cli_reference_is_the_parsers_help(site):
    from metacorrect.cli import build_parser

    text = page_text(site, "cli")
    for command in ("metacorrect run", "metacorrect compare", "metacorrect sweep", "metacorrect submit",
                    "metacorrect data prepare", "metacorrect data inspect"):
        assert f"usage: {command}" in text, command
    parser = build_parser()
    options = {opt for action in parser._subparsers._group_actions[0].choices["sweep"]._actions
               for opt in action.option_strings}
    for opt in options:
        assert opt in text, opt


def test_method_pages_generate_their_defaults(site):
    from metacorrect.methods import METHODS

    for name, method in METHODS.items():
        page = "methods/baselines" if name in ("erm", "clean_only") else f"methods/{name}"
        text = page_text(site, page)
        for f in dataclasses.fields(method.config_class):
            if f.name != "name":
                assert f"method.{f.name}" in text, (name, f.name)


def test_readme_is_short_and_points_to_the_docs():
    readme = (ROOT / "README.md").read_text()
    lines = readme.splitlines()
    assert lines[0].startswith("# "), "title first"
    assert len(lines) <= 160, len(lines)
    for target in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / target).is_file(), target
