"""Every `rcl-dist ...` line in the README's code blocks parses with the CLI's own parser: a documented
flag that the command does not take (or a renamed subcommand) fails here, not on a newcomer's machine."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _commands() -> list[str]:
    blocks = re.findall(r"```[^\n]*\n(.*?)```", README.read_text(), flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    # placeholders ([key=value ...], $VARS) are syntax for the reader, not arguments
    return [line for line in lines if line.startswith("rcl-dist ") and "[" not in line and "$" not in line]


def test_the_readme_has_commands_to_check():
    assert len(_commands()) >= 5


@pytest.mark.parametrize("line", _commands())
def test_readme_command_parses(line):
    from rcl_dist.cli import _parser

    try:
        args = _parser().parse_args(shlex.split(line)[1:])
    except SystemExit as e:  # argparse's way of refusing
        pytest.fail(f"README: `{line}` does not parse ({e})")
    overrides = [o for o in getattr(args, "overrides", None) or [] if o != "..."]
    if args.command == "pretrain" and overrides:  # config keys and values are checked by the config itself
        from rcl_dist.config import load_config

        load_config(None, overrides)
