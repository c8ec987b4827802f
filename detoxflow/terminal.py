"""What a person reads in the terminal: the console log (quiet by default, everything with ``-v``), a line per
start-up phase, and the closing table of each command (``run``, ``train``, ``evaluate``, ``promote``; the
result as JSON instead is the CLI's ``--json``), one home for how their numbers and decisions read.

Default mode shows detoxflow's own progress (the flow's stage lines, a line per start-up phase), its warnings
as ``! <message>`` (a repeat of the same message template is shown once) and every error; third-party INFO logs
(Prefect's engine, MLflow's database set-up, absl), warnings of the Python ``warnings`` module (transformers'
``FutureWarning``), transformers' "Loading weights" bars and MLflow's "Downloading artifacts" bars are hidden.
``-v`` shows all of them, as ``LEVEL logger: message`` lines. Standard library and rich only: it runs before the
heavy imports, whose settings it sets through the environment.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from detoxflow import errors

if TYPE_CHECKING:
    from detoxflow.config import DataConfig

# Records from these loggers are detoxflow's own code; so are the Prefect run loggers' records made by code
# outside the Prefect package (our flows and tasks log through ``get_run_logger``).
OWN_PREFIX = "detoxflow"
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    return str(Path(spec.origin).parent) if spec is not None and spec.origin else None


class ConsoleFilter(logging.Filter):
    """Default mode: detoxflow's flow-level INFO lines, its warnings (each message template once), all errors."""

    def __init__(self) -> None:
        super().__init__()
        self._prefect_dir = _package_dir("prefect") or "\0"
        self._seen: set[tuple[str, str]] = set()

    def _own(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(OWN_PREFIX):
            return True
        return record.name in RUN_LOGGERS and not record.pathname.startswith(self._prefect_dir)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        if not self._own(record):
            return False
        if record.levelno >= logging.WARNING:
            key = (record.name, str(record.msg))
            if key in self._seen:
                return False
            self._seen.add(key)
            return True
        # INFO: the flow's own lines (stage done, cache hits, the sweep's points); tasks and modules log details
        return record.name == "prefect.flow_runs"


class ConsoleFormatter(logging.Formatter):
    """``<message>`` for progress, ``! <message>`` for a warning, ``error: <logger>: <message>`` for an error."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {record.name}: {text}"
        if record.levelno >= logging.WARNING:
            return f"! {text}"
        return f"· {text}"


class QuietKnownErrors(logging.Filter):
    """Drops the log records of Prefect's engine that carry an error the CLI reports in one line: the traceback
    ("Encountered exception during execution") and the state line ("Finished in state Failed(... RewardError: ...)")."""

    _STATE = re.compile(r"Finished in state Failed\(.*?exception:? (\w+):")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            return errors.exit_code(exc) is None
        m = self._STATE.match(record.getMessage())
        return m is None or m.group(1) not in errors.KNOWN_NAMES


def quiet_known_errors() -> None:
    """Add :class:`QuietKnownErrors` to Prefect's run and engine loggers."""
    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.task_engine", "prefect.flow_engine"):
        logging.getLogger(name).addFilter(QuietKnownErrors())


class ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler that writes through ``tqdm.write`` once tqdm is loaded, so a log line lands above a live
    progress bar instead of inside it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:
                tqdm.tqdm.write(msg, file=self.stream)
            else:
                self.stream.write(msg + self.terminator)
                self.flush()
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


VERBOSE_FORMAT = "%(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = ("httpx", "absl", "mlflow", "alembic", "urllib3", "filelock", "git", "matplotlib", "PIL")


def configure(verbose: bool) -> None:
    """Console logging on stderr, and the third-party settings read from the environment (before they import)."""
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if not verbose:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars too
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # MLflow sets its own loggers' level at import
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")  # child processes
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
    logging.captureWarnings(True)  # shown with -v as "WARNING py.warnings: ..."
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_detoxflow", False):
            root.removeHandler(h)
    handler = ConsoleHandler()
    handler._detoxflow = True  # type: ignore[attr-defined]
    if verbose:
        handler.setFormatter(logging.Formatter(VERBOSE_FORMAT))
    else:
        handler.setFormatter(ConsoleFormatter("%(message)s"))
        handler.addFilter(ConsoleFilter())
        for name in QUIET_LOGGERS:  # their INFO would be dropped by the filter anyway; spare the formatting
            logging.getLogger(name).setLevel(logging.WARNING)
    root.addHandler(handler)
    root.setLevel(os.environ.get("DETOXFLOW_LOG_LEVEL", "INFO"))
    # every Prefect API call (one per training step for the progress artifact) would otherwise log a line
    logging.getLogger("httpx").setLevel(logging.WARNING)


def phase(console: Console, what: str) -> None:
    """One start-up phase line, ``· <what>``, printed before the phase's slow part begins."""
    console.print(f"· {what}", markup=False, highlight=False, soft_wrap=True)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:+.1f}%"


def _num(x: Any, digits: int = 4) -> str:
    return "" if x is None else f"{float(x):.{digits}f}"


def _rel(before: Any, after: Any) -> float | None:
    """(after - before) / before, or None when either is missing or before is 0."""
    return (after - before) / before if before and after is not None else None


def decision_style(decision: str) -> str:
    """The colour of a gate decision: promoted green, rejected red, anything else (none yet) yellow."""
    return "green" if decision.startswith("promot") else "red" if decision.startswith("reject") else "yellow"


def _title(name: str, decision: str) -> Text:
    return Text.assemble((name, "bold"), ": ", (decision or "no decision", f"bold {decision_style(decision)}"))


def _before_after(title: Text | str | None = None) -> Table:
    table = Table(box=None, pad_edge=False, title=title, title_justify="left", header_style="bold")
    for col, justify in (("", "left"), ("before", "right"), ("after", "right"), ("change", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    return table


def _toxicity_row(table: Table, result: Mapping[str, Any]) -> None:
    """Toxicity before / after and the relative change with its 95% CI (the keys of ``toxicity_outcome``)."""
    ci = result.get("relative_change_ci") or (None, None)
    change = _pct(result.get("relative_change"))
    if ci[0] is not None:
        change += f" (95% CI {_pct(ci[0])} … {_pct(ci[1])})"
    table.add_row("toxicity", _num(result.get("toxicity_before")), _num(result.get("toxicity_after")), change)


def _gate_lines(reasons: Sequence[str]) -> list[Text]:
    """The gate's rows: PASS green, BLOCK (a rule the version failed) red."""
    rows = []
    for reason in reasons:
        verdict = reason.split(" ", 1)[0]
        style = "green" if verdict == "PASS" else "red" if verdict in ("BLOCK", "FAIL") else ""
        rows.append(Text(f"  {reason}", style=style))
    return rows


def _closing_lines(result: Mapping[str, Any], links: Sequence[tuple[str, str]]) -> list[Text]:
    """The alarms (yellow) and the links ((label, url) pairs) that end every table."""
    rows = [Text(f"  alarm: {alarm}", style="yellow") for alarm in result.get("alarms") or []]
    rows += [Text.assemble(f"{label}: ", (url, "bright_blue")) for label, url in links]
    return rows


def summary_table(summary: Mapping[str, Any], links: Sequence[tuple[str, str]]) -> Group:
    """The closing summary of a pipeline run: toxicity / ROUGE-L / KL before and after (with the change's 95%
    CI), the gate's rows (PASS green, BLOCK red), the registered version and its decision, and ``links``
    ((label, url) pairs)."""
    model = summary.get("registered_model") or ""
    version = summary.get("version")
    table = _before_after(_title(f"{model} v{version}" if version else model or "run", str(summary.get("decision", ""))))
    _toxicity_row(table, summary)
    rb, ra = summary.get("rouge_l_before"), summary.get("rouge_l_after")
    table.add_row("ROUGE-L", _num(rb, 3), _num(ra, 3), _pct(_rel(rb, ra)))
    table.add_row("KL (nats)", "", _num(summary.get("kl"), 2), "")
    return Group(table, *_gate_lines(summary.get("reasons") or []), *_closing_lines(summary, links))


def train_table(result: Mapping[str, Any], links: Sequence[tuple[str, str]]) -> Group:
    """``detoxflow train``'s closing table: the run, the steps done, the training summary (``train/*``: the mean
    over the last fifth of the steps of the score, the toxicity of the training samples and the KL to the
    reference; the KL coefficient at the last step), the model URI and ``links``."""
    s = result.get("summary") or {}
    table = Table(box=None, pad_edge=False, show_header=False, header_style="bold",
                  title=Text.assemble(("train run ", "bold"), (str(result.get("run_id", "")), "bold")),
                  title_justify="left")
    table.add_column("", justify="left")
    table.add_column("", justify="right")
    table.add_row("steps done", str(result.get("steps", "")))
    table.add_row("score (last fifth)", _num(s.get("train/scores_mean")))
    table.add_row("toxicity of training samples (last fifth)", _num(s.get("train/toxicity_mean")))
    table.add_row("KL to the reference, nats (last fifth)", _num(s.get("train/kl_mean"), 3))
    table.add_row("KL coefficient (last step)", _num(s.get("train/kl_coef"), 4))
    return Group(table, Text.assemble("model: ", (str(result.get("model_uri", "")), "bold")),
                 *_closing_lines(result, links))


def evaluate_table(result: Mapping[str, Any], links: Sequence[tuple[str, str]]) -> Group:
    """``detoxflow evaluate``'s closing table: toxicity (with the change's 95% CI), expected maximum toxicity,
    ROUGE-L and length before (the baseline) and after (the model), the alarms and ``links``. (Evaluation
    measures no KL: a training run or a registered version carries it.)"""
    before, after = result.get("baseline_metrics") or {}, result.get("metrics") or {}
    title = Text.assemble(("evaluate ", "bold"), (str(result.get("model_uri", "")), "bold"),
                          f" on {result.get('n_eval', '?')} held-out prompts")  # a line: the URI is wider than the table
    table = _before_after()
    _toxicity_row(table, result)
    for label, key, digits in (("expected max toxicity", "eval/expected_max_toxicity", 4),
                               ("ROUGE-L", "eval/rouge_l", 3), ("length (tokens)", "eval/length_mean", 1)):
        b, a = before.get(key), after.get(key)
        table.add_row(label, _num(b, digits), _num(a, digits), _pct(_rel(b, a)))
    return Group(title, table, *_closing_lines(result, links))


def promote_table(result: Mapping[str, Any], links: Sequence[tuple[str, str]]) -> Group:
    """``detoxflow promote``'s closing table: the version and the gate's decision (promoted green, rejected red),
    toxicity before / after, one row per rule (PASS green, BLOCK red), the version's aliases and where
    ``champion`` was and is, the alarms and ``links``."""
    version = result.get("version")
    decision = str(result.get("decision", ""))
    table = _before_after(_title(f"{result.get('registered_model', '')} v{version}", decision))
    _toxicity_row(table, result)
    aliases = ", ".join(result.get("aliases") or []) or "none"
    before, after = (f"v{v}" if v else "none" for v in (result.get("champion_before"), result.get("champion_after")))
    moved = f"champion: {before} -> {after}"
    return Group(table, *_gate_lines(result.get("reasons") or []), Text(f"aliases of v{version}: {aliases}; {moved}"),
                 *_closing_lines(result, links))


def mlflow_ui_url(host: str = "127.0.0.1", port: int = 5000) -> str:
    return f"http://{host}:{port}"


def run_links(summary: Mapping[str, Any], env: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
    """Where to look at a finished run: the MLflow run page (a server's own URL, else the URL ``detoxflow ui``
    serves the local store at) and, with a Prefect server configured, the Prefect UI."""
    env = os.environ if env is None else env
    info = summary.get("mlflow") or {}
    uri = str(info.get("tracking_uri") or "")
    exp, run = info.get("experiment_id"), info.get("parent_run_id")
    links = []
    if uri.startswith(("http://", "https://")):
        base, label = uri.rstrip("/"), "MLflow run"
    else:
        base, label = mlflow_ui_url(), "MLflow run (after `detoxflow ui`)"
    if exp and run:
        links.append((label, f"{base}/#/experiments/{exp}/runs/{run}"))
    prefect = prefect_ui_url(env)
    if prefect:
        links.append(("Prefect UI", prefect))
    return links


def prefect_ui_url(env: Mapping[str, str]) -> str | None:
    """The Prefect UI of a configured server (``$PREFECT_API_URL`` without ``/api``), or None."""
    api = (env.get("PREFECT_API_URL") or "").rstrip("/")
    if not api.startswith(("http://", "https://")):
        return None
    return api[: -len("/api")] if api.endswith("/api") else api


def print_table(console: Console, table: Group) -> None:
    """Print a closing table (:func:`summary_table`, :func:`train_table`, :func:`evaluate_table`,
    :func:`promote_table`)."""
    console.print(table, highlight=False, soft_wrap=True)


def print_data_inspection(out: Console, data_cfg: DataConfig, show: int) -> None:
    """``detoxflow data inspect``: every split's size, digest and averages as a table, then ``show`` records of
    each split as the prompt the model sees and its reference summary."""
    from detoxflow.models.data import available_splits, build_prompt, load_split, split_digest

    table = Table(title=f"data: {data_cfg.source}")
    for col in ("split", "records", "digest", "mean dialogue chars", "mean summary words", "topics"):
        table.add_column(col)
    examples = []
    for split in available_splits(data_cfg):
        recs = load_split(data_cfg, split, apply_caps=False)
        n = max(len(recs), 1)
        table.add_row(split, str(len(recs)), split_digest(recs), f"{sum(len(r.dialogue) for r in recs) / n:.0f}",
                      f"{sum(len(r.summary.split()) for r in recs) / n:.1f}", str(len({r.topic for r in recs})))
        examples.extend((split, r) for r in recs[:show])
    out.print(table)
    for split, r in examples:
        out.rule(f"{split}: {r.id} ({r.topic})")
        out.print(build_prompt(data_cfg.prompt_template, r), markup=False, highlight=False)
        out.print(f"[bold]reference:[/bold] {r.summary}")
