"""The `detoxflow` command. Heavy imports happen inside commands so that `--help` stays instant."""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape

from detoxflow import errors, paths, preflight, terminal
from detoxflow.config import GENERATE_MAX_QUERY_TOKENS, Config, dump_yaml, load_config

app = typer.Typer(
    help="detoxflow: make a language model less toxic with PEFT-PPO and a KL-penalised reward.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect configs.", no_args_is_help=True)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
registry_app = typer.Typer(help="Maintain the model registry.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(data_app, name="data")
app.add_typer(registry_app, name="registry")

console = Console(stderr=True)
out = Console()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config, e.g. configs/default.yaml")]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="override a field: --set ppo.steps=5 (repeatable)")
]
FreshOpt = Annotated[
    bool, typer.Option("--fresh", help="start a new run instead of resuming an unfinished one of this config and data")
]
ResumeOpt = Annotated[
    str | None, typer.Option("--resume", metavar="RUN_ID", help="resume this unfinished MLflow run")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout instead of a table")]


class UserError(errors.InputError):
    """Bad input a user can fix; the CLI prints the message and exits with code 2 (see detoxflow.errors)."""


_state = {"debug": False}


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show the traceback of an error, and Prefect's")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show every log line, third-party ones too")] = False,
    home: Annotated[Path | None, typer.Option(
        "--home", envvar=paths.HOME_ENV, show_envvar=False,
        help="state folder (runs, MLflow store); default: $DETOXFLOW_HOME, the nearest .detoxflow/ above the "
        "working directory, else ~/.local/share/detoxflow")] = None,
) -> None:
    """Options for every command."""
    _state["debug"] = debug
    if home is not None:  # children (Prefect tasks, training ranks) find the same home
        os.environ[paths.HOME_ENV] = str(home.expanduser().resolve())
    terminal.configure(verbose or debug)


def _config_path(config: Path) -> Path:
    """``config`` as given, else found in the project (:func:`detoxflow.paths.resolve_config`)."""
    found = paths.resolve_config(config)
    if not found.is_file():
        looked = ", ".join(str(c) for c in paths.config_candidates(config))
        raise UserError(f"--config {config}: config file not found (looked in {looked}). Pass an existing YAML file, "
                        "e.g. configs/default.yaml from the detoxflow project")
    return found


def _load(config: Path | None, overrides: list[str] | None) -> Config:
    return load_config(None if config is None else _config_path(config), overrides or [])


def _checked(config: Path | None, overrides: list[str] | None, *, model_uri: str | None = None) -> Config:
    """The config of a command that writes, after the preflight checks (before any heavy import)."""
    config = None if config is None else _config_path(config)
    preflight.check_config_file(config)
    cfg = _load(config, overrides)
    preflight.preflight(cfg, model_uri=model_uri)
    return cfg


def _quiet_prefect() -> None:
    """Without ``--debug``, a known error is one line from the CLI, not also a traceback per task and flow."""
    _state["flow_started"] = True
    if not _state["debug"]:
        terminal.quiet_known_errors()


def _setup_env() -> None:
    # Prefect's ephemeral server with analytics on hits "database is locked" on SQLite.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The ephemeral API migrates its SQLite database on first start; 20 s (Prefect's default) is not enough on a
    # busy 2-core machine, where `detoxflow run` then fails before any stage runs (120 s failed once at load 12-15).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow retries an HTTP request 7 times with backoff (minutes against a dead server): bound it for the run
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # OpenMP threads that spin while waiting make torch several times slower on a shared machine; torch reads
    # this when its thread pool starts, which is after this point (heavy imports happen inside commands).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@config_app.command("show")
def config_show(config: ConfigOpt = Path("configs/default.yaml"), set_: SetOpt = None) -> None:
    """Print the resolved config (file + overrides + defaults) as YAML."""
    cfg = _load(config, set_)
    out.print(dump_yaml(cfg), end="", markup=False, highlight=False)


@config_app.command("reference")
def config_reference() -> None:
    """Print the config reference page (every field, type, default, bounds) as markdown: > docs/config.md."""
    from detoxflow.config_reference import reference_markdown

    sys.stdout.write(reference_markdown())


@data_app.command("inspect")
def data_inspect(
    config: ConfigOpt = Path("configs/default.yaml"),
    set_: SetOpt = None,
    show: Annotated[int, typer.Option(help="records to print per split")] = 1,
) -> None:
    """Load every split of the configured dataset, validate it, and print sizes, digests and examples."""
    terminal.print_data_inspection(out, _load(config, set_).data, show)


@registry_app.command("migrate")
def registry_migrate(
    model: Annotated[str | None, typer.Option(help="one registered model; default: every detoxflow model")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would change; change nothing")] = False,
) -> None:
    """Re-register the versions logged before the policy was an MLflow model as pyfunc models (MLflow's loader and
    `mlflow models serve` read them) and move their aliases; a second run does nothing."""
    preflight.check_tracking(None)
    from detoxflow import tracking

    tracking.use_store(None, "registry migrate")
    for line in tracking.migration_report(tracking.migrate_registry(model, dry_run=dry_run), dry_run=dry_run):
        out.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def bootstrap(
    arch: Annotated[str, typer.Argument(help="t5, gpt2, llama or all")] = "all",
) -> None:
    """Build (or find in the cache) the embedded offline models: tokenizer + small T5 / GPT-2 / Llama, warm-started."""
    from detoxflow.models.bootstrap import ensure_embedded

    archs = ["t5", "gpt2", "llama"] if arch == "all" else [arch]
    for a in archs:
        if a not in ("t5", "gpt2", "llama"):
            raise UserError(f"bootstrap: unknown architecture '{a}'. Allowed: t5, gpt2, llama, all")
        out.print(f"{a}: {ensure_embedded(a)}")


def _check_resume_options(fresh: bool, resume: str | None) -> None:
    if fresh and resume:
        raise UserError("--fresh and --resume RUN_ID exclude each other: start over, or resume that run")


def _resumable(
    cfg: Config, command: Literal["pipeline", "train"], fresh: bool, resume: str | None,
    start: Callable[[str | None, str], dict[str, Any]],
) -> dict[str, Any]:
    """Run ``start(resume_run_id, resume_key)`` (a flow) under this command's own Prefect server, resuming an
    unfinished run of the same fingerprint unless ``fresh`` (:mod:`detoxflow.tasks.resume`)."""
    from detoxflow.children import prefect_api_configured, prefect_server

    store = paths.tracking_uri(cfg, create=False)
    where = "" if cfg.work_dir or os.environ.get("DETOXFLOW_WORK_DIR") else f"; home {paths.find_home().describe()}"
    terminal.phase(console, f"{command} {cfg.name}: MLflow store {store}{where}")
    if not prefect_api_configured():
        terminal.phase(console, "starting a local Prefect API server for this command")
    with prefect_server():  # before Prefect is imported (by start's flow import): it reads PREFECT_API_URL once
        terminal.phase(console, "loading Prefect and MLflow, opening the store (its first use creates the tables)")
        from detoxflow.tasks.resume import resumable

        _quiet_prefect()
        from prefect.logging.handlers import APILogHandler

        try:
            with resumable(cfg, command, fresh=fresh, run_id=resume) as plan:
                if plan.message:
                    console.print(plan.message, markup=False, highlight=False, soft_wrap=True)
                return start(plan.run_id, plan.key)
        finally:  # send the queued run logs while this server answers: later, minutes of retries and an error
            APILogHandler().flush()


def _print_result(result: dict[str, Any], json_: bool, table: Callable[..., Any]) -> None:
    """A command's result: JSON on stdout with ``--json``, else ``table(result, links)`` (detoxflow.terminal)."""
    if json_:
        out.print_json(json.dumps(result, default=str))
    else:
        terminal.print_table(out, table(result, terminal.run_links(result)))


@app.command()
def run(
    config: ConfigOpt = Path("configs/default.yaml"), set_: SetOpt = None, fresh: FreshOpt = False,
    resume: ResumeOpt = None, json_: JsonOpt = False,
) -> None:
    """Run the whole pipeline (prepare -> baseline -> train -> evaluate -> gate) as a Prefect flow; an unfinished
    run of the same config and data is resumed from its newest checkpoint (--fresh: start over)."""
    _check_resume_options(fresh, resume)
    cfg = _checked(config, set_)

    def start(run_id: str | None, key: str) -> dict[str, Any]:
        terminal.phase(console, "loading the pipeline (torch, transformers)")
        from detoxflow.flows.pipeline import pipeline

        return pipeline(cfg, resume_run_id=run_id, resume_key=key)

    _print_result(_resumable(cfg, "pipeline", fresh, resume, start), json_, terminal.summary_table)


@app.command()
def train(
    config: ConfigOpt = Path("configs/default.yaml"),
    set_: SetOpt = None,
    num_processes: Annotated[
        int | None,
        typer.Option("--num-processes", "-n", min=1,
                     help="data-parallel processes, started with accelerate launch (sets orchestration.train_processes)"),
    ] = None,
    fresh: FreshOpt = False,
    resume: ResumeOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Run PEFT-PPO training alone (the `train` flow), tracked in MLflow; an unfinished run of the same config and
    data is resumed from its newest checkpoint (--fresh: start over)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every rank would start its own flow run and MLflow run; the flow launches the ranks itself instead
        raise UserError(
            "train: started by a multi-process launcher (WORLD_SIZE is set). Run `detoxflow train --num-processes N` "
            "without accelerate launch / torchrun: it starts the N processes itself, and only rank 0 logs to MLflow"
        )
    overrides = [*(set_ or []), *([f"orchestration.train_processes={num_processes}"] if num_processes else [])]
    _check_resume_options(fresh, resume)
    cfg = _checked(config, overrides)

    def start(run_id: str | None, key: str) -> dict[str, Any]:
        terminal.phase(console, "loading the trainer (torch, transformers)")
        from detoxflow.flows.train import train_flow

        return train_flow(cfg, resume_run_id=run_id, resume_key=key)

    _print_result(_resumable(cfg, "train", fresh, resume, start), json_, terminal.train_table)


@app.command("train-rank", hidden=True)
def train_rank(
    config_json: Annotated[Path, typer.Option(help="the run's config as JSON")],
    run_id: Annotated[str, typer.Option(help="MLflow run that rank 0 logs to")],
    work_key: Annotated[str, typer.Option(help="keys the checkpoint folder")],
    result: Annotated[Path, typer.Option(help="where rank 0 writes the result JSON")],
    expected_train_digest: Annotated[str | None, typer.Option()] = None,
) -> None:
    """One rank of a multi-process training run; started by `accelerate launch` from the train_ppo task."""
    from detoxflow.children import die_with_launcher

    die_with_launcher()  # even a launcher killed with -9 leaves no rank behind
    terminal.configure(True)  # the ranks' output is the launch's log file (ranks.log), not a person's terminal
    cfg = Config.model_validate_json(config_json.read_text())
    from detoxflow.tasks.training import run_rank

    run_rank(cfg, run_id, work_key, result, expected_train_digest)


@app.command()
def evaluate(
    model: Annotated[str, typer.Option(help="models:/NAME@alias, runs:/..., or a model artifact directory")],
    config: ConfigOpt = Path("configs/default.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Evaluate a model on the held-out split (the `evaluate` flow)."""
    cfg = _checked(config, set_, model_uri=model)
    from detoxflow.flows.evaluate import evaluate_flow

    _quiet_prefect()
    _print_result(evaluate_flow(cfg, model_uri=model), json_, terminal.evaluate_table)


@app.command()
def promote(
    model: Annotated[str, typer.Option(help="models:/NAME/VERSION or models:/NAME@challenger")],
    config: ConfigOpt = Path("configs/default.yaml"),
    set_: SetOpt = None,
    json_: JsonOpt = False,
) -> None:
    """Evaluate a registered version and run the promotion gate on it (the `promote` flow)."""
    cfg = _checked(config, set_, model_uri=model)
    from detoxflow.flows.promote import promote_flow

    _quiet_prefect()
    _print_result(promote_flow(cfg, model_uri=model), json_, terminal.promote_table)


@app.command()
def sweep(
    config: ConfigOpt = Path("configs/sweep.yaml"),
    set_: SetOpt = None,
    settings: Annotated[Path | None, typer.Option(
        help="YAML list of settings, e.g. [{label: rloo, ppo.backend: rloo}]; default: no KL, two fixed, two adaptive")] = None,
    json_: JsonOpt = False,
) -> None:
    """Train at several KL settings and chart the reward-hacking frontier (the `kl_sweep` flow)."""
    cfg = _checked(config, set_)
    points = None
    if settings is not None:
        import yaml

        if not settings.is_file():
            raise UserError(f"--settings {settings}: no such file; give a YAML list of settings")
        points = yaml.safe_load(settings.read_text(encoding="utf-8"))
        if not isinstance(points, list):
            raise UserError(f"--settings {settings}: expected a YAML list of settings, got {type(points).__name__}")
    from detoxflow.flows.kl_sweep import kl_sweep
    from detoxflow.tasks.sweep import resolve_settings

    resolve_settings(cfg, points)  # a bad setting fails here, before Prefect and MLflow start
    _quiet_prefect()
    result = kl_sweep(cfg, points)
    if json_:
        out.print_json(json.dumps(result, default=str))
    else:
        for line in str(result.get("headline", "")).split("; "):
            out.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command()
def generate(
    prompt: Annotated[list[str], typer.Argument(help="one or more prompts")],
    model: Annotated[str, typer.Option(help="models:/NAME@champion, runs:/..., or a model artifact directory")],
    max_new_tokens: int = 48,
    sample: Annotated[bool, typer.Option(help="sample instead of greedy decoding")] = False,
    truncation: Annotated[str, typer.Option(
        help=f"a prompt over {GENERATE_MAX_QUERY_TOKENS} tokens: keep_instruction (cut its middle, keep its start "
        "and its closing 'Summary:') or refuse")] = "keep_instruction",
) -> None:
    """Generate with a registered (or local) model; reads the store, creates nothing."""
    from pydantic import ValidationError

    from detoxflow.config import DataConfig, GenerationConfig

    try:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=sample)
    except ValidationError as e:
        raise UserError(f"generate --max-new-tokens {max_new_tokens}: {errors.one_line(e)}") from None
    try:
        data_cfg = DataConfig(max_query_tokens=GENERATE_MAX_QUERY_TOKENS, truncation=truncation)  # type: ignore[arg-type]
    except ValidationError:
        raise UserError(f"generate --truncation {truncation}: use keep_instruction or refuse") from None
    preflight.check_model_uri(model, None)
    preflight.check_tracking(None)
    from detoxflow.tracking import load_generator

    # the registered MLflow model itself, as mlflow.pyfunc.load_model and `mlflow models serve` load it
    for text in load_generator(model).summarize(list(prompt), gen, data_cfg):
        out.print(text, markup=False, highlight=False, soft_wrap=True)


@app.command()
def doctor(
    mode: Annotated[str, typer.Option(help="auto: team when a Prefect API or an MLflow server is configured, "
                                           "else local; or local / team")] = "auto",
) -> None:
    """Check what the current mode needs (local: the home and its store; team: servers, database, bucket, work
    pools) and say what is wrong; exit 0 when healthy."""
    from detoxflow.doctor import run_doctor

    if mode not in ("auto", "local", "team"):
        raise UserError(f"doctor --mode {mode}: use auto, local or team")
    raise typer.Exit(run_doctor(out, mode=None if mode == "auto" else mode))


@app.command()
def ui(port: Annotated[int, typer.Option(help="local UI port (127.0.0.1)")] = 5000) -> None:
    """Open the results: start MLflow's UI on the current store (127.0.0.1) and print its link; with a tracking
    server (team mode), print the MLflow and Prefect UIs' links."""
    from detoxflow import ui as ui_mod

    p = ui_mod.plan(port)
    if p.command is None:
        for label, link in p.links:
            out.print(f"{label}: {link}", markup=False, highlight=False, soft_wrap=True)
        return
    raise typer.Exit(ui_mod.serve(p, lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True)))


@app.command()
def serve(
    mode: Annotated[str, typer.Argument(help="team: PostgreSQL + MLflow server + Prefect server + workers, natively")] = "team",
    root: Annotated[Path | None, typer.Option(help="state folder for the native stack; default: <home>/team")] = None,
) -> None:
    """Start the team stack natively (without Docker); Ctrl-C stops it."""
    if mode != "team":
        raise UserError(f"serve: unknown mode '{mode}'. Allowed: team")
    from detoxflow.team import serve_team

    serve_team(root or paths.find_home().path / "team")


@app.command()
def deploy() -> None:
    """Create the work pools and register the deployments of prefect.yaml against $PREFECT_API_URL."""
    from detoxflow.team import deploy_all

    deploy_all()


def main() -> None:
    _setup_env()
    try:
        app()
    except Exception as e:
        code = errors.exit_code(e)
        if code is None:
            raise  # a bug: its traceback, exit 1
        if _state["debug"]:
            traceback.print_exc()
        if _state.get("flow_started"):
            console.file.write("\n")  # a progress bar may have left its line open
        console.print(f"[bold red]error:[/bold red] {escape(errors.one_line(e))}", highlight=False, soft_wrap=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
