"""docs/usage.md against the parser: every option of every `unet-np <command> --help` is documented.

The parser is built by unet_np.cli.build_parser() and walked, so a new option (or a new command)
makes this test fail until usage.md mentions it. The document has one `## ` section per command,
whose heading names it as `unet-np <command>`; each option string of that command (`--tile`, `-o`)
must appear in that section, as a whole option (`--tile` is not found inside `--tile-size`).
Options that every command takes (`--debug`, `--quiet`) may instead be documented once, in the
section whose heading says "every command". argparse's own `-h/--help` is described once in the
introduction. Conversely, every `--option` the document names must exist in some command (or be one
of the few non-unet-np options listed in OTHER_TOOLS), so a removed or renamed option fails too."""
import argparse
import os
import re

import pytest

from unet_np.cli import build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = os.path.join(ROOT, "docs", "usage.md")
HELP = {"-h", "--help"}
# options the document names that belong to other tools: the benchmark script's (benchmarks/cpu.py,
# which `unet-np bench` runs) and pip's
OTHER_TOOLS = {"--threads", "--quick", "--index-url"}


def _commands():
    """{command: [option strings]} from the parser, in its order."""
    parser = build_parser()
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(subs) == 1, "unet-np has one level of sub-commands"
    return {name: [s for act in sp._actions for s in act.option_strings if s not in HELP]
            for name, sp in subs[0].choices.items()}


def _sections():
    """[(heading, text)] for every `## ` section of usage.md (text includes the heading and runs to
    the next `## ` heading; fenced code blocks are part of it)."""
    with open(USAGE, encoding="utf-8") as f:
        lines = f.read().splitlines()
    out, head, body = [], None, []
    for line in lines:
        if line.startswith("## "):
            if head is not None:
                out.append((head, "\n".join(body)))
            head, body = line, [line]
        elif head is not None:
            body.append(line)
    if head is not None:
        out.append((head, "\n".join(body)))
    return out


def _mentions(text, option):
    return re.search(r"(?<![\w-])" + re.escape(option) + r"(?![\w-])", text) is not None


def _section_of(command):
    found = [text for head, text in _sections() if f"`unet-np {command}`" in head]
    return found


COMMANDS = _commands()
COMMON = set.intersection(*(set(v) for v in COMMANDS.values()))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_one_section(command):
    found = _section_of(command)
    assert len(found) == 1, (f"docs/usage.md needs exactly one '## ...' heading naming "
                             f"`unet-np {command}`; found {len(found)}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_documented_in_its_commands_section(command):
    found = _section_of(command)
    assert found, f"no section for unet-np {command}"
    common = [text for head, text in _sections() if "every command" in head.lower()]
    missing = []
    for option in COMMANDS[command]:
        if _mentions(found[0], option):
            continue
        if option in COMMON and any(_mentions(t, option) for t in common):
            continue
        missing.append(option)
    assert not missing, (f"`unet-np {command} --help` has option(s) that docs/usage.md does not "
                         f"document in the unet-np {command} section: {' '.join(missing)}")


def test_every_documented_option_exists():
    known = set().union(*(set(v) for v in COMMANDS.values())) | HELP | OTHER_TOOLS
    with open(USAGE, encoding="utf-8") as f:
        text = f.read()
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))
    unknown = sorted(named - known)
    assert not unknown, f"docs/usage.md names options no unet-np command has: {' '.join(unknown)}"


def test_the_help_is_described():
    with open(USAGE, encoding="utf-8") as f:
        intro = f.read().split("\n## ", 1)[0]
    assert _mentions(intro, "--help")


def test_the_backend_default_is_the_parsers():
    """usage.md says --backend defaults to auto (numba when installed, else numpy)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sp in sub.choices.items():
        for act in sp._actions:
            if "--backend" in act.option_strings:
                assert act.default == "auto", name
    with open(USAGE, encoding="utf-8") as f:
        text = f.read()
    assert "--backend auto|numpy|numba|cupy|numba-cuda` [auto]" in text.replace("\\|", "|")
