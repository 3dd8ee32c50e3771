"""The one base class of every user-facing diffloop error.

A ``DiffloopError`` is a mistake the user can fix (a config value, a missing file or weight, a
reward that failed): ``diffloop.cli.main`` prints it as one line ``diffloop: error: <message>``
and exits with status 2, never with a traceback. Its message names what is wrong and the fix.
Anything else that escapes is a bug in diffloop and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import NoReturn


class DiffloopError(Exception):
    """A user error; the message is one line naming the field or file and the fix."""


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``options`` (difflib), or "" if none is close."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|ref):`~?\.?([^`]+)`")
_LITERAL = re.compile(r"``(.+?)``", re.DOTALL)


def plain_text(text: str) -> str:
    """Docstring (reST) markup as a terminal should show it: a double-backquoted literal in single
    backquotes, a role (func, class, mod, ...) as the last name of its target in single backquotes,
    a literal block's closing "::" as ":". Every ``--help`` text goes through it (``CommandParser``
    and the config key list of train / check-config), so markup never reaches a user."""
    text = _ROLE.sub(lambda m: f"`{m[1].split('.')[-1]}`", text)
    text = _LITERAL.sub(r"`\1`", text)
    return re.sub(r"::$", ":", text, flags=re.MULTILINE)


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for the subcommands whose bad input is reported, like every other
    user error, as one line ``diffloop: error: <command>: <message>`` (no usage block: ``--help``
    shows it) with exit status 2. Its help is plain text (:func:`plain_text`)."""

    def format_help(self) -> str:
        return plain_text(super().format_help())

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("diffloop ").strip() or "diffloop"
        self.exit(2, f"diffloop: error: {command}: {message} (see `{self.prog} --help`)\n")
