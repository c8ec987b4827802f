"""The one table of errors a user can fix, and their exit codes: 2 for bad input, 3 for the environment.

The classes are named by module and class name, so that mapping an exception costs no import of the ML core
(torch) or of MLflow. :func:`exit_code` walks the exception's class hierarchy, then its ``__cause__`` chain (a
wrapper raised ``from`` a known error maps like it); an exception it does not know is a bug: the CLI shows its
traceback and exits 1. :func:`one_line` is the message the CLI prints.
"""

from __future__ import annotations

import errno

BAD_INPUT = 2
ENVIRONMENT = 3


class InputError(ValueError):
    """Bad input a user can fix (a file, a value, a name); exit code 2."""


class EnvironmentFault(RuntimeError):
    """Something around the run is missing or broken (a server that does not answer, a full disk); exit 3."""


# "module.Class" -> exit code; subclasses map like their nearest listed base.
EXIT_CODES: dict[str, int] = {
    "detoxflow.errors.InputError": BAD_INPUT,
    "detoxflow.errors.EnvironmentFault": ENVIRONMENT,
    "detoxflow.config.ConfigError": BAD_INPUT,
    "detoxflow.models.data.DataError": BAD_INPUT,
    "detoxflow.models.reward.RewardError": BAD_INPUT,  # the reward raised, or returned NaN/inf: the user's scorer
    "detoxflow.models.checkpoint.TrainingError": BAD_INPUT,  # NaN/inf in training: settings (learning rate, reward)
    "detoxflow.models.checkpoint.DiskFullError": ENVIRONMENT,
    "detoxflow.models.checkpoint.DamagedCheckpointError": ENVIRONMENT,
    "detoxflow.children.ServerStartError": ENVIRONMENT,  # the command's own Prefect server did not start
    "detoxflow.models.artifact.PolicyError": BAD_INPUT,
    "detoxflow.models.evaluate.EvaluationError": BAD_INPUT,
    "detoxflow.models.promotion.PromotionError": BAD_INPUT,
    "detoxflow.tracking.backend.TrackingError": BAD_INPUT,
    "detoxflow.tracking.backend.TrackingUnreachable": ENVIRONMENT,  # the server stopped answering mid-run
    "detoxflow.team.processes.TeamError": BAD_INPUT,
    "detoxflow.locks.LockTimeout": ENVIRONMENT,
    "pydantic_core._pydantic_core.ValidationError": BAD_INPUT,  # a CLI value outside its schema's range
}

KNOWN_NAMES = frozenset(name.rsplit(".", 1)[1] for name in EXIT_CODES)  # class names, to read Prefect's state lines


def _code_of(exc: BaseException) -> int | None:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ENVIRONMENT
    for cls in type(exc).__mro__:
        code = EXIT_CODES.get(f"{cls.__module__}.{cls.__qualname__}")
        if code is not None:
            return code
    return None


def known_error(exc: BaseException) -> BaseException | None:
    """``exc`` or the first exception of its ``__cause__`` chain that the table knows, else None."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if _code_of(cur) is not None:
            return cur
        cur = cur.__cause__
    return None


def exit_code(exc: BaseException) -> int | None:
    """2 (bad input) or 3 (environment) for an error a user can fix, None for anything else (a bug)."""
    known = known_error(exc)
    return None if known is None else _code_of(known)


def one_line(exc: BaseException) -> str:
    """The message of the known error behind ``exc``, on one line (a config error lists its fields with '; ')."""
    known = known_error(exc) or exc
    if isinstance(known, OSError) and known.errno == errno.ENOSPC:
        where = known.filename or "the work dir or the model cache"
        return f"disk full at {where}: free space there (or point DETOXFLOW_WORK_DIR elsewhere) and run again"
    if type(known).__name__ == "ValidationError" and hasattr(known, "errors"):
        parts = []
        for err in known.errors():  # type: ignore[attr-defined]
            field = ".".join(str(p) for p in err.get("loc", ())) or "value"
            parts.append(f"{field} = {err.get('input')!r}: {err.get('msg', '')}")
        return "; ".join(parts)
    text = str(known).strip() or type(known).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
