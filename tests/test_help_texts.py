"""``--help`` is written for users: every command's help starts with a usage line, shows no
docstring markup or notes about the code, and describes every argument."""

from __future__ import annotations

import argparse
import re

import pytest

from diffloop.cli import COMMAND_SUMMARIES, COMMANDS, main
from diffloop.errors import CommandParser, plain_text

# every command's help, and the subcommands of `shapes`
HELP_ARGV = [[name] for name in COMMANDS] + [["shapes", "pretrain"]]
MARKUP = ("``", ":func:", ":class:", ":mod:", ":meth:")
NOTES = ("in-process", "tests call", "issue", "TODO")
MODULE_PATH = re.compile(r"\bdiffloop\.[a-z_]+\.[a-z_]")  # diffloop.tools.x, diffloop.export.y ...


def help_of(argv: list[str], capsys, monkeypatch) -> tuple[str, list[argparse.ArgumentParser]]:
    """(what ``diffloop ARGV --help`` prints, the CommandParsers it built)."""
    parsers: list[argparse.ArgumentParser] = []
    parse = CommandParser.parse_known_args

    def recording(self, *args, **kwargs):
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(CommandParser, "parse_known_args", recording)
    try:
        code = main([*argv, "--help"])
    except SystemExit as e:  # argparse's --help
        code = e.code
    out, err = capsys.readouterr()
    assert code == 0 and not err, (argv, err)
    return out, parsers


def assert_user_text(text: str, where: str) -> None:
    for bad in MARKUP + NOTES:
        assert bad not in text, f"{where}: {bad!r} in its help"


@pytest.mark.parametrize("argv", HELP_ARGV, ids=" ".join)
def test_every_commands_help_is_user_text_and_describes_every_argument(argv, capsys, monkeypatch):
    out, parsers = help_of(argv, capsys, monkeypatch)
    assert out.startswith("usage: diffloop "), out[:200]
    assert_user_text(out, " ".join(argv))
    if argv[0] not in ("train", "check-config"):  # those list the config keys (field docs)
        assert not MODULE_PATH.search(out), MODULE_PATH.search(out)
    for parser in parsers:
        assert parser.description, parser.prog
        for action in parser._actions:
            assert action.help and action.help.strip(), (
                f"{parser.prog}: {action.option_strings or action.dest}"
            )


def test_diffloop_help_says_what_diffloop_is_and_lists_every_command(capsys, monkeypatch):
    out, _ = help_of([], capsys, monkeypatch)
    assert out.startswith("usage: diffloop COMMAND")
    assert_user_text(out, "diffloop")
    assert not MODULE_PATH.search(out) and "main(" not in out
    assert "diffloop fine-tunes text-to-image diffusion models" in out
    assert set(COMMAND_SUMMARIES) == set(COMMANDS)
    for name, summary in COMMAND_SUMMARIES.items():
        assert f"\n  {name:<14}{summary}\n" in out, name


def test_no_argument_prints_the_help_and_fails(capsys):
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: diffloop COMMAND")


def test_plain_text_drops_docstring_markup():
    assert plain_text("``x = 1`` and :func:`~diffloop.loops.eval_seeds`, :class:`Foo`") == (
        "`x = 1` and `eval_seeds`, `Foo`"
    )
    assert plain_text("A sweep file::\n\n    base: x") == "A sweep file:\n\n    base: x"
    assert plain_text("a plain `ps` line") == "a plain `ps` line"
