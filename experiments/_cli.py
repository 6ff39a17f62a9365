"""Hydra-specific helpers of the entry points: schema registration, and override checks whose failures are one
line. The one error wrapper of every app is :func:`qat.errors.one_line_errors` (re-exported here)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra.core.config_store import ConfigStore

from qat.errors import QatError, one_line_errors
from qat.schema import RunConfig
from qat.tracking import register_resolvers


def register_schemas() -> None:
    """Register the typed run config so a misspelt key or a wrong type fails at compose time, and the
    ``${qat_unique:}`` resolver of the run directories."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    register_resolvers()


def register_detect_schemas() -> None:
    """The same for the detection app (``configs/detect.yaml``): its typed config and ``${qat_unique:}``."""
    from qat.detection.config import DetectRunConfig

    ConfigStore.instance().store(name="detect_schema", node=DetectRunConfig)
    register_resolvers()


def register_eval_schemas() -> None:
    """The eval app's typed config (``configs/eval.yaml``: :class:`qat.evaluation.EvalConfig`) and the run
    schemas its groups use."""
    from qat.evaluation import EvalConfig

    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    register_schemas()


def register_latency_schemas() -> None:
    """The latency app's typed config (``configs/latency_app.yaml``: :class:`qat.latency.app.LatencyAppConfig`)
    and ``${qat_unique:}`` of its sweep directory."""
    from qat.latency.app import LatencyAppConfig

    ConfigStore.instance().store(name="latency_app_schema", node=LatencyAppConfig)
    register_resolvers()


def _hydra_error(exc: BaseException, override: str) -> QatError:
    """Hydra's multi-line composition error as one naming the key: ``<key>: <problem> (<fix>)``."""
    from hydra.errors import MissingConfigException

    text = str(exc)
    if isinstance(exc, MissingConfigException):
        group = text.split("Could not find '", 1)[-1].split("'", 1)[0]
        key, _, name = group.rpartition("/")
        options = [line.strip() for line in text.split("Available options in", 1)[-1].splitlines()[1:]
                   if line.startswith("\t") and "=" not in line]
        fix = f"choose one of: {', '.join(options)}" if options else "check the config group's name"
        return QatError(key or group, f"no option {name!r} (given as {override!r})", fix)
    cause = exc.__cause__ or exc
    detail = str(cause).splitlines()[0] if str(cause).strip() else type(cause).__name__
    key = getattr(cause, "full_key", None) or override.split("=", 1)[0].lstrip("+~")
    fix = "check the spelling against the config tree (configs/) and qat/schema.py"
    if type(cause).__name__ == "ValidationError":
        fix = "give a value of the key's type"
    return QatError(key, detail, fix)


@one_line_errors
def check_overrides(config_name: str, argv: list[str] | None = None) -> None:
    """Compose the config once per given value before Hydra runs, so a wrong group option, a misspelt key or a
    wrong type is one line naming the key (exit 2) instead of Hydra's multi-line report. Sweep values
    (``a,b``) are each checked with the other overrides at their first value; ``QAT_DEBUG=1`` shows Hydra's
    error."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg") or a.startswith("--") for a in args):
        return  # Hydra's own flags: let Hydra handle them
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra's parser errors are reported as one line
        raise QatError("overrides", str(exc).splitlines()[0], "see Hydra's override grammar") from exc

    def pinned(o, value: str) -> str:  # type: ignore[no-untyped-def]
        return f"{o.get_key_element()}={value}"

    first = [pinned(o, next(iter(o.sweep_string_iterator()))) if o.is_sweep_override() else o.input_line
             for o in parsed]
    trials = [first]
    for i, o in enumerate(parsed):
        if o.is_sweep_override():
            trials += [[*first[:i], pinned(o, v), *first[i + 1:]] for v in o.sweep_string_iterator()]
    config_dir = str(Path(__file__).resolve().parents[1] / "configs")
    for trial in trials:
        try:
            with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
                compose(config_name, overrides=trial, return_hydra_config=True)
        except Exception as exc:  # noqa: BLE001 - any composition failure is reported the same way
            if os.environ.get("QAT_DEBUG"):
                raise
            culprit = next((t for t in trial if t.split("=", 1)[0].lstrip("+~") in str(exc)), " ".join(trial))
            raise _hydra_error(exc, culprit) from exc


__all__ = ["check_overrides", "one_line_errors", "register_detect_schemas", "register_eval_schemas",
           "register_latency_schemas", "register_schemas"]
