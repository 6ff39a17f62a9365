"""One exception type for bad input: a message naming the config key or path, and how to fix it.

Drivers catch :class:`QatError`, print its one-line message to stderr and exit non-zero before anything
is written (see ``experiments/_cli.py``).
"""

from __future__ import annotations


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
