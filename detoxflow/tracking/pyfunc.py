"""The policy as an MLflow pyfunc model: what ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and
``detoxflow generate`` all load.

A trained policy is logged once, through MLflow 3's logged-model API (:func:`log_policy`): a ``LoggedModel``
named ``model`` whose source run is the training run, holding an MLflow model with

- the parts of the saved artifact (:mod:`detoxflow.models.artifact`) as pyfunc artifacts: ``base`` (local
  bases), ``adapter`` (the PEFT LoRA adapter), ``tokenizer``, ``value_head`` and ``meta`` (``detoxflow.json``),
  plus ``sft_adapter`` when one was merged; MLflow copies them side by side into the model's ``artifacts/``
  folder, which is therefore a complete artifact folder (:func:`policy_root` finds it);
- a signature: a ``prompt`` text column in, a ``summary`` text column out, the generation settings as params
  (:data:`PARAM_DEFAULTS`), and an input example;
- explicit ``pip_requirements`` (the installed versions of what inference imports, never inferred) and the
  detoxflow version and git sha in the MLmodel ``metadata``;
- a model card (``model_card.md``, :func:`write_model_card`) once the gate has decided.

The model is logged "from code" (:mod:`detoxflow.tracking.model_code`, no pickled object), so loading it
needs detoxflow installed, as serving it with ``--env-manager local`` in the project's environment does.
:class:`PolicyModel` is the wrapper: ``load_context`` builds a :class:`~detoxflow.models.policy.Policy` from the
artifacts, ``predict`` calls :meth:`PolicyModel.summarize`, which ``detoxflow generate`` calls too.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import pandas as pd
from mlflow.entities import LoggedModelOutput, LoggedModelStatus
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import detoxflow
from detoxflow.config import GENERATE_MAX_QUERY_TOKENS, DataConfig, GenerationConfig
from detoxflow.tracking.backend import MODEL_ARTIFACT, TAG_GIT_SHA, TAG_VERSION, _client
from detoxflow.tracking.lineage import git_state

if TYPE_CHECKING:
    from detoxflow.models.policy import Policy

PROMPT_COLUMN = "prompt"
SUMMARY_COLUMN = "summary"
MODEL_TYPE = "detoxflow-policy"
MODEL_CARD = "model_card.md"
MODEL_CODE = Path(__file__).with_name("model_code.py")  # logged as the model's code: no pickled object
META_FILE = "detoxflow.json"  # detoxflow.models.artifact.ARTIFACT_META (that module imports torch)
# The parts of a saved artifact folder, as pyfunc artifact name -> file or folder name inside it.
PARTS = {"meta": META_FILE, "adapter": "adapter", "tokenizer": "tokenizer", "value_head": "value_head.pt",
         "base": "base", "sft_adapter": "sft_adapter"}
REQUIRED_PARTS = ("meta", "adapter", "tokenizer", "value_head")
# Generation settings a caller may pass as params (greedy by default, as `detoxflow generate`).
PARAM_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 48,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "truncation": "keep_instruction",
}
_PARAM_TYPES = {bool: "boolean", int: "long", float: "double", str: "string"}
# What inference imports, pinned to the installed versions (the environment the model was trained in).
REQUIREMENTS = ("mlflow", "torch", "transformers", "peft", "tokenizers", "pandas", "pydantic", "pyyaml")
EXAMPLE_PROMPT = ("Summarize the following conversation.\n\n#Person1#: The parcel came late and broken.\n"
                  "#Person2#: I am sorry, we will send a new one today.\n\nSummary:")


def signature() -> ModelSignature:
    """``prompt`` (string) in, ``summary`` (string) out; generation settings as params with their defaults."""
    params = ParamSchema([ParamSpec(k, _PARAM_TYPES[type(v)], v) for k, v in PARAM_DEFAULTS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string", PROMPT_COLUMN)]),
                          outputs=Schema([ColSpec("string", SUMMARY_COLUMN)]), params=params)


def pip_requirements() -> list[str]:
    """``name==installed version`` for each of :data:`REQUIREMENTS` (explicit: MLflow infers nothing)."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def generation_settings(params: Mapping[str, Any] | None) -> tuple[GenerationConfig, DataConfig]:
    """Params (missing ones at :data:`PARAM_DEFAULTS`) -> the generation and truncation settings; an unknown
    name or a bad value raises ValueError naming it."""
    given = dict(params or {})
    unknown = sorted(set(given) - set(PARAM_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown generation param(s) {unknown}; allowed: {sorted(PARAM_DEFAULTS)}")
    p = {**PARAM_DEFAULTS, **given}
    gen = GenerationConfig(max_new_tokens=int(p["max_new_tokens"]), min_new_tokens=0, do_sample=bool(p["do_sample"]),
                           temperature=float(p["temperature"]), top_p=float(p["top_p"]), top_k=int(p["top_k"]))
    data = DataConfig(max_query_tokens=GENERATE_MAX_QUERY_TOKENS, truncation=p["truncation"])
    return gen, data


def _prompts(model_input: Any) -> list[str]:
    """A DataFrame with a ``prompt`` column, a list of strings, or one string -> the prompts."""
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        if PROMPT_COLUMN not in model_input.columns:
            raise ValueError(f"input has columns {list(model_input.columns)}; send a '{PROMPT_COLUMN}' column")
        return [str(x) for x in model_input[PROMPT_COLUMN]]
    if isinstance(model_input, Mapping) and PROMPT_COLUMN in model_input:
        value = model_input[PROMPT_COLUMN]
        return [value] if isinstance(value, str) else [str(x) for x in value]
    return [str(x) for x in model_input]


class PolicyModel(PythonModel):
    """The pyfunc wrapper of a detoxflow policy (base + LoRA adapter + tokenizer)."""

    def __init__(self) -> None:
        self.policy: Policy | None = None

    def load_context(self, context: Any) -> None:
        root = Path(context.artifacts["meta"]).parent
        self.policy = _load_policy(root)

    @classmethod
    def from_folder(cls, root: str | os.PathLike[str], device: str = "auto") -> PolicyModel:
        """The wrapper around an artifact folder (an MLflow model's ``artifacts/`` or a folder written before the
        policy was an MLflow model), without MLflow's loader."""
        model = cls()
        model.policy = _load_policy(Path(root), device)
        return model

    def summarize(self, prompts: Sequence[str], gen: GenerationConfig, data: DataConfig) -> list[str]:
        """Prompts in, one summary each, in order: the one generation path of ``predict`` and ``generate``."""
        from detoxflow.models.prompts import check_lengths, template_tail

        if self.policy is None:
            raise RuntimeError("PolicyModel: no policy loaded (load it with mlflow.pyfunc.load_model)")
        names = [f"prompt {i + 1}" for i in range(len(prompts))]
        check_lengths(self.policy.tokenizer, prompts, names, data, "generate")
        return self.policy.generate_texts(list(prompts), gen, max_query_tokens=data.max_query_tokens,
                                          tail=template_tail(data.prompt_template))

    # the input annotated as a DataFrame: MLflow then validates against the logged signature, not a type hint
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        gen, data = generation_settings(params)
        return pd.DataFrame({SUMMARY_COLUMN: self.summarize(_prompts(model_input), gen, data)})


def _load_policy(root: Path, device: str = "auto") -> Policy:
    from detoxflow.models.policy import Policy

    return Policy.from_artifact(root, device=device)


def policy_root(model_dir: str | os.PathLike[str]) -> Path | None:
    """The artifact folder inside a downloaded model: ``artifacts/`` of an MLflow model, the folder itself for a
    model logged before the policy was an MLflow model, else None."""
    root = Path(model_dir)
    for candidate in (root / "artifacts", root):
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def artifact_parts(artifact_dir: str | os.PathLike[str]) -> dict[str, str]:
    """The pyfunc ``artifacts`` mapping of a saved artifact folder (parts it lacks, e.g. a hub base, left out)."""
    root = Path(artifact_dir)
    missing = [PARTS[k] for k in REQUIRED_PARTS if not (root / PARTS[k]).exists()]
    if missing:
        raise ValueError(f"{root}: not a saved policy (missing {', '.join(missing)}); pass the folder "
                         "Policy.save_artifact wrote")
    return {k: str(root / name) for k, name in PARTS.items() if (root / name).exists()}


def log_policy(artifact_dir: str | os.PathLike[str], run_id: str, *, step: int = 0,
               tags: Mapping[str, str] | None = None) -> str:
    """Log a saved policy as the pyfunc model ``model`` of training run ``run_id``; returns its model id.

    The LoggedModel is created first (``mlflow.initialize_logged_model``, source run ``run_id``), the pyfunc
    model is logged into it, and the run lists it among its outputs, so ``runs:/<run_id>/model``,
    ``models:/<model id>`` and the versions registered from it all name the same model."""
    cli = _client()
    run = cli.get_run(run_id)
    sha, _ = git_state()
    meta = {TAG_VERSION: detoxflow.__version__, **({TAG_GIT_SHA: sha} if sha else {})}
    logged = mlflow.initialize_logged_model(name=MODEL_ARTIFACT, source_run_id=run_id, model_type=MODEL_TYPE,
                                            experiment_id=run.info.experiment_id, tags={**meta, **(tags or {})})
    mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT, model_id=logged.model_id, python_model=str(MODEL_CODE),
        artifacts=artifact_parts(artifact_dir), signature=signature(),
        input_example=(pd.DataFrame({PROMPT_COLUMN: [EXAMPLE_PROMPT]}), {"max_new_tokens": 8}),
        pip_requirements=pip_requirements(), metadata=meta,
    )
    # log_model links the model to the run when that run is active in this thread; a Prefect task in a worker
    # thread has none, so the link is made here
    outputs = cli.get_run(run_id).outputs
    if logged.model_id not in {o.model_id for o in (outputs.model_outputs if outputs else [])}:
        cli.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=step)])
    return logged.model_id


def logged_model_of_run(run_id: str) -> str | None:
    """The id of the newest complete (READY) pyfunc model ``model`` that :func:`log_policy` logged for
    ``run_id``, or None (a run from before the policy was an MLflow model, or one whose upload never finished)."""
    cli = _client()
    run = cli.get_run(run_id)
    outputs = run.outputs.model_outputs if run.outputs else []
    for out in reversed(outputs or []):
        with contextlib.suppress(MlflowException):
            logged = cli.get_logged_model(out.model_id)
            if logged.name == MODEL_ARTIFACT and logged.status == LoggedModelStatus.READY:
                return out.model_id
    return None


def link_metrics(model_id: str, metrics: Mapping[str, float], run_id: str) -> None:
    """Log ``metrics`` (evaluation numbers) on ``run_id`` linked to the logged model ``model_id``, so the
    model's page lists them beside the run's."""
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, run_id=run_id, model_id=model_id,
                       synchronous=True)


def write_model_card(model_id: str, card: str) -> None:
    """Write ``card`` (markdown) as ``model_card.md`` into the logged model's artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / MODEL_CARD
        path.write_text(card, encoding="utf-8")
        _client().log_model_artifact(model_id, str(path))


def model_card(facts: Mapping[str, Any]) -> str:
    """The model card: one markdown table row per fact (base, reward, data digest, toxicity, the decision)."""
    lines = ["# detoxflow policy", "", "| | |", "|---|---|"]
    for key, value in facts.items():
        text = json.dumps(value) if not isinstance(value, str) else value
        lines.append(f"| {key} | {text.replace('|', '/').replace(chr(10), '<br>')} |")
    return "\n".join(lines) + "\n"
