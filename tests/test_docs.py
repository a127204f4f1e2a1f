"""The documentation says what the code does: the README's set-up commands and size, every
EditConfig field and CLI flag documented, relative links that resolve, no references to
documents outside the repository."""

import dataclasses
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as fh:
        return fh.read()


def _markdown_files():
    out = ["README.md", "CHANGELOG.md"]
    for folder in ("docs", "experiments", "bench"):
        out += [os.path.join(folder, n) for n in sorted(os.listdir(os.path.join(ROOT, folder)))
                if n.endswith(".md")]
    return out


def test_readme_is_short_and_keeps_the_setup_commands():
    text = _read("README.md")
    assert len(text.splitlines()) <= 150
    assert "bash scripts/install.sh && ultraedit demo" in text
    assert "TRITON_INTERPRET=1 python -m pytest -q tests" in text


@pytest.mark.parametrize("path", _markdown_files())
def test_relative_links_resolve(path):
    text = _read(path)
    base = os.path.dirname(os.path.join(ROOT, path))
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert os.path.exists(os.path.normpath(os.path.join(base, target))), (path, target)


_PATH = re.compile(r"(?<![\w/.])((?:python|tests|bench|docs|experiments|scripts|csrc|"
                   r"ultraedit_kernels)/[\w./-]*\.[A-Za-z0-9]+)(?![\w/{*])")


@pytest.mark.parametrize("path", _markdown_files())
def test_repository_paths_named_in_the_docs_exist(path):
    """A file named by its repository path exists (outputs under bench/out aside)."""
    missing = [p for p in _PATH.findall(_read(path))
               if not p.startswith("bench/out") and "*" not in p
               and not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, (path, missing)


def test_every_config_field_and_flag_is_documented():
    from ultraedit.config import EditConfig

    config_doc, cli_doc = _read("docs", "config.md"), _read("docs", "cli.md")
    for f in dataclasses.fields(EditConfig):
        assert f"`{f.name}`" in config_doc, f.name
        assert f"--{f.name.replace('_', '-')}" in cli_doc, f.name


def test_every_cli_option_is_documented():
    from ultraedit.cli import build_parser

    cli_doc = _read("docs", "cli.md")
    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        for action in parser._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag not in ("--help",):
                    assert flag in cli_doc or flag.replace("--no-", "--") in cli_doc, (name, flag)


def test_every_command_prints_its_help(capsys):
    """``ultraedit COMMAND --help`` works (argparse formats help texts with %: a literal percent
    sign in a field's help must not break it) and names every flag of the command."""
    from ultraedit.cli import build_parser, main

    sub = build_parser()._subparsers._group_actions[0].choices
    for name, parser in sub.items():
        with pytest.raises(SystemExit) as done:
            main([name, "--help"])
        assert done.value.code == 0, name
        out = capsys.readouterr().out
        for action in parser._actions:
            for flag in action.option_strings:
                assert flag in out, (name, flag)


@pytest.mark.parametrize("top", ["README.md", "CHANGELOG.md", "docs", "experiments", "bench",
                                 "tests", os.path.join("python", "ultraedit", "cli"),
                                 os.path.join("python", "ultraedit", "eval"),
                                 os.path.join("python", "ultraedit", "data")])
def test_no_references_to_documents_outside_the_repository(top):
    # design notes and tracker numbers that a reader of the repository cannot open
    pattern = re.compile(r"DESIGN\.md|\bi[s]sues?\s*#?\d+|\bi[s]sue's\b")
    path = os.path.join(ROOT, top)
    files = ([path] if os.path.isfile(path) else
             [os.path.join(folder, n) for folder, _, names in os.walk(path) for n in names])
    hits = [f"{os.path.relpath(f, ROOT)}:{i}" for f in files if f.endswith((".py", ".md"))
            for i, line in enumerate(open(f, encoding="utf-8", errors="replace"), 1)
            if pattern.search(line)]
    assert not hits, hits
