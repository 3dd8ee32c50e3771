"""The one base class of every user-facing diffloop error.

A ``DiffloopError`` is a mistake the user can fix (a config value, a missing file or weight, a
reward that failed): ``diffloop.cli.main`` prints it as one line ``diffloop: error: <message>``
and exits with status 2, never with a traceback. Its message names what is wrong and the fix.
Anything else that escapes is a bug in diffloop and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
from typing import NoReturn


class DiffloopError(Exception):
    """A user error; the message is one line naming the field or file and the fix."""


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``options`` (difflib), or "" if none is close."""
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` for the subcommands whose bad input is reported, like every other
    user error, as one line ``diffloop: error: <command>: <message>`` (no usage block: ``--help``
    shows it) with exit status 2."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("diffloop ").strip() or "diffloop"
        self.exit(2, f"diffloop: error: {command}: {message} (see `{self.prog} --help`)\n")
