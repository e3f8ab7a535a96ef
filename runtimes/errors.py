"""One error hierarchy for every dewey tool, and the exit code each kind of error ends a CLI with.

Every error a user can cause or fix (a bad option, a damaged model folder, a missing package, an
export that could not be made or did not verify) is a ``DeweyError``; each subclass carries its exit
code, and ``cli_errors`` turns any of them into one line on stderr and that code, the same way in
``dewey-export``, ``dewey-embed`` and ``dewey-train``. Anything else that escapes is a bug and keeps
its traceback. The classes also derive from the built-in exception a caller would catch without
knowing dewey (``ValueError`` for bad input, ``ImportError`` for a missing package), so library code
that catches those keeps working. No third-party import: ``click`` is imported by ``cli_errors`` only.
"""

from __future__ import annotations

import functools

# The exit codes of every dewey CLI.
EXIT_OK = 0
EXIT_VERIFICATION_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PARTIAL = 3


class DeweyError(Exception):
    """The root of dewey's errors; ``exit_code`` is what a CLI exits with when it stops on one."""

    exit_code = EXIT_BAD_INPUT


class BadInputError(DeweyError, ValueError):
    """Bad usage or input: an option, an argument or a data file that cannot be used as given."""


class ModelFileError(BadInputError):
    """A model folder or one of its files is missing, corrupt or inconsistent."""


class MissingDependencyError(DeweyError, ImportError):
    """A package (or device) that the asked-for work needs is not installed; the message says how."""


class ExportError(DeweyError, RuntimeError):
    """An export could not be made (refused options or output path, or a build step failed)."""


class VerificationFailed(DeweyError):
    """A check ran and failed: parity, the quality gate, or files that differ from their manifest."""

    exit_code = EXIT_VERIFICATION_FAILED


class PartialFailure(DeweyError):
    """The run finished, but part of its work failed (listed where the message says)."""

    exit_code = EXIT_PARTIAL


def exit_code_for(exc: BaseException) -> int:
    """The exit code a CLI ends with on ``exc``: the DeweyError's own; an OSError (a path that cannot be
    read or written) is bad input. Any other exception is a bug, not an answer: a ValueError here."""
    if isinstance(exc, DeweyError):
        return exc.exit_code
    if isinstance(exc, OSError):
        return EXIT_BAD_INPUT
    raise ValueError(f"no exit code for {type(exc).__name__}: only DeweyError and OSError are user errors")


def cli_errors(command):
    """Make a click command or group end on any DeweyError or OSError (its subcommands' too) with one
    line on stderr and ``exit_code_for``'s code, never a traceback."""
    import click

    invoke = command.invoke

    @functools.wraps(invoke)
    def invoke_reporting_errors(ctx):
        try:
            return invoke(ctx)
        except (DeweyError, OSError) as exc:
            error = click.ClickException(" ".join(line.strip() for line in str(exc).splitlines()))
            error.exit_code = exit_code_for(exc)
            raise error from None

    command.invoke = invoke_reporting_errors
    return command
