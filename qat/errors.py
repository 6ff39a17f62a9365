"""One exception type for bad input, and the one way every app reports it.

:class:`QatError` names the config key or path at fault, the problem and how to fix it. Every app under
``experiments/`` (Hydra and argparse alike) turns it into one line on stderr, ``error: <key>: <problem> (<fix>)``,
and exit status 2, through :func:`one_line_errors`; with ``QAT_DEBUG=1`` the traceback is shown instead.
:class:`ArgumentParser` makes argparse's own usage errors the same kind of line. Both live in the library, not
beside the scripts, so that launchers which pickle a Hydra app's task function (submitit) find them in the job's
process.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

BAD_INPUT = 2
"""Exit status of every app on bad input."""


class QatError(Exception):
    """Bad input detected before or during a run: ``key`` names the config key or path at fault."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.key}: {self.problem}"
        return f"{text} ({self.fix})" if self.fix else text


class NoIntegerForm(QatError):
    """A valid model with an op the canonical integer model cannot express yet (MobileNet v3's hardswish,
    Choukroun's two-tensor layers): the one conversion failure after which a run may still record its
    simulated accuracy, as ``status: simulated_only``. Every other conversion error stops the run."""


def choice_error(key: str, value: object, choices: list[str] | tuple[str, ...]) -> QatError:
    """The error for an unknown name: lists the valid choices."""
    return QatError(key, f"unknown value {value!r}", "valid choices: " + ", ".join(sorted(choices)))


F = TypeVar("F", bound=Callable[..., Any])


def report_error(exc: QatError) -> int:
    """Print ``exc`` as one ``error:`` line on stderr and return :data:`BAD_INPUT`."""
    print(f"error: {exc.one_line()}", file=sys.stderr)
    return BAD_INPUT


def one_line_errors(fn: F | None = None, *, exit: bool = True) -> Any:
    """Decorator of an app's entry function: a :class:`QatError` becomes one ``error:`` line on stderr and exit
    status 2; ``QAT_DEBUG=1`` lets it propagate (traceback).

    ``@one_line_errors`` exits (``sys.exit(2)``): for Hydra apps, whose ``main``'s return value is not the
    process's exit status. ``@one_line_errors(exit=False)`` returns 2 instead: for an argparse app's
    ``main(argv) -> int``, run as ``sys.exit(main())``, so that callers (tests) get the status back."""

    def decorate(func: F) -> F:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return func(*args, **kwargs)
            except QatError as exc:
                if os.environ.get("QAT_DEBUG"):
                    raise
                status = report_error(exc)
                if exit:
                    sys.exit(status)
                return status

        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors (a missing argument, an invalid choice or type) are a
    :class:`QatError` naming the argument, so that :func:`one_line_errors` reports them like any bad input: one
    line, exit status 2, instead of argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        key, problem = "arguments", message
        required = "the following arguments are required: "
        if message.startswith(required):
            key, problem = message.removeprefix(required), "missing (required)"
        elif message.startswith("argument ") and ": " in message:
            key, problem = message.removeprefix("argument ").split(": ", 1)
            key = key.split("/")[-1]  # "-o/--out" -> "--out"
        raise QatError(key, problem, f"see {self.prog} --help")
