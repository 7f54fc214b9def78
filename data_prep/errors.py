"""The one base of the project's errors, and how a command reports them.

Every error the packages raise on purpose derives from :class:`WorkbookError` *and* from the
built-in exception that says what kind of problem it is (``class GridError(WorkbookError,
ValueError)``), so code that catches ``ValueError`` or ``FileNotFoundError`` catches it too.  A command catches
``WorkbookError`` and nothing else: a wrong setting, a missing file or a full disk is one line on
stderr naming the problem and the fix, while any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

#: Exit status of a command stopped by a problem with its input or setup.
EXIT_SETUP_ERROR = 2


class WorkbookError(Exception):
    """A problem with the input or the setup, not a bug: the command prints one line naming it
    and the fix, and exits with status 2 (:attr:`exit_status`)."""

    #: The status a command exits with for this error.
    exit_status: int = EXIT_SETUP_ERROR


class InputNotFoundError(WorkbookError, FileNotFoundError):
    """A file or folder a command or function was pointed at (a manifest, a table, a finished
    run) is not there; the message names it and what makes it."""


def one_line(error: BaseException) -> str:
    """An error's message on one line (its lines joined), or its type's name when it has none."""
    return " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or type(error).__name__


def first_line(error: BaseException) -> str:
    """The first line of an error's message (or its type's name), for quoting a library's
    error inside a message of our own."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def report(error: WorkbookError) -> int:
    """Print ``error: <message>`` as one line on stderr; return the status to exit with."""
    print(f"error: {one_line(error)}", file=sys.stderr)
    return error.exit_status


def run_reporting(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run ``command(args)``; a :class:`WorkbookError` becomes one line on stderr and its exit
    status, every other exception propagates with its traceback."""
    try:
        return command(args)
    except WorkbookError as error:
        return report(error)
