"""Shared bits of the Hydra entry points: schema registration and one-line errors."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.core.config_store import ConfigStore

from qat.errors import QatError
from qat.schema import RunConfig
from qat.tracking import register_resolvers


def register_schemas() -> None:
    """Register the typed run config so a misspelt key or a wrong type fails at compose time, and the
    ``${qat_unique:}`` resolver of the run directories."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_resolvers()


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn :class:`QatError` into one line on stderr and exit 2 (a traceback only with QAT_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except QatError as exc:
            if os.environ.get("QAT_DEBUG"):
                raise
            print(f"error: {exc.one_line()}", file=sys.stderr)
            sys.exit(2)

    return wrapper
