"""The one config schema: pydantic v2, extra="forbid", a section per stage.

The same model is the Prefect flow parameter (so the UI renders a form) and, flattened, the MLflow params.
Load with :func:`load_config` (YAML file + ``a.b=value`` overrides); every problem surfaces as a
:class:`ConfigError` whose message names the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem a user can fix: the message says which field, what was wrong and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class DataConfig(_Section):
    source: str = Field(
        "embedded",
        description="'embedded' (the corpus shipped in data/), a local .jsonl/.csv/.parquet file or folder of "
        "split files, or 'hf:<dataset id>' for the Hugging Face hub (e.g. hf:knkarthick/dialogsum)",
    )
    id_field: str = "id"
    dialogue_field: str = "dialogue"
    summary_field: str = "summary"
    topic_field: str = "topic"
    train_split: str = "train"
    eval_split: str = Field("test", description="held-out split for baseline and aligned evaluation")
    prompt_template: str = Field(
        "Summarize the following conversation.\n\n{dialogue}\n\nSummary:",
        description="must contain {dialogue}",
    )
    min_dialogue_chars: int = Field(0, ge=0)
    max_dialogue_chars: int = Field(100_000, ge=1)
    max_query_tokens: int = Field(256, ge=8, le=8192)
    truncation: Literal["keep_instruction", "refuse"] = Field(
        "keep_instruction",
        description="a prompt over max_query_tokens: 'keep_instruction' cuts the dialogue and keeps the template "
        "around it (e.g. the trailing 'Summary:'), logged with counts; 'refuse' stops, naming the record",
    )
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if "{dialogue}" not in self.prompt_template:
            raise ValueError("prompt_template must contain the placeholder {dialogue}")
        if self.min_dialogue_chars >= self.max_dialogue_chars:
            raise ValueError("min_dialogue_chars must be smaller than max_dialogue_chars")
        return self


EMBEDDED_MODELS = ("embedded:t5", "embedded:gpt2", "embedded:llama")


class ModelConfig(_Section):
    name_or_path: str = Field(
        "embedded:t5",
        description="'embedded:t5' / 'embedded:gpt2' / 'embedded:llama' (built offline by detoxflow), a hub id, or a local "
        "directory",
    )
    arch: Literal["auto", "seq2seq", "causal"] = "auto"
    revision: str | None = Field(None, description="hub revision (commit) to pin; recorded in the registry")
    sft_adapter: str | None = Field(
        None, description="a supervised LoRA adapter the policy starts from; it is merged, so the reference is the SFT policy"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads; None = all cores")
    fast_path: Literal["auto", "off"] = Field(
        "auto",
        description="'auto': a functional forward for GPT-2 / T5 / the Llama family (detoxflow.models.fastpath) where it implements the model, "
        "else the HF modules; 'off': always the HF modules",
    )

    @field_validator("fast_path", mode="before")
    @classmethod
    def _yaml_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare `off` as false (and `on` as true): take them as the words the user wrote
        if value is False:
            return "off"
        if value is True:
            return "auto"
        return value

    @field_validator("name_or_path")
    @classmethod
    def _known_embedded(cls, value: str) -> str:
        # keep in step with models/bootstrap.py SETTINGS (not imported here: it pulls in torch)
        if value.startswith("embedded:") and value not in EMBEDDED_MODELS:
            raise ValueError(f"unknown embedded model; use one of {', '.join(EMBEDDED_MODELS)}, "
                             "a hub id or a local directory")
        return value


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="written to the adapter's PEFT config; never applied by PPO, whose passes all run without dropout",
    )
    target_modules: list[str] | None = Field(None, description="None = per-architecture default (q,v for T5; c_attn for GPT-2)")


class RewardConfig(_Section):
    kind: Literal["profanity_check", "hf_classifier", "callable"] = "profanity_check"
    model: str | None = Field(None, description="hf_classifier: hub id or local directory of a sequence classifier")
    revision: str | None = None
    reward_label: str | int | None = Field(
        None, description="hf_classifier: label (name or index) whose logit/prob is the reward, e.g. 'nothate'"
    )
    toxic_label: str | int | None = Field(None, description="hf_classifier: label whose probability is the toxicity")
    output: Literal["logit", "prob"] = "logit"
    callable: str | None = Field(None, description="callable: 'package.module:function' (texts -> toxicity probs)")
    input: Literal["summary", "query+summary"] = Field("summary", description="what the scorer reads")
    batch_size: int = Field(32, ge=1)
    max_length: int = Field(512, ge=8)
    scale: float = Field(1.0, gt=0, description="multiplies the score before it enters the PPO reward")

    @model_validator(mode="after")
    def _check(self) -> RewardConfig:
        if self.kind == "hf_classifier" and not self.model:
            raise ValueError("reward.kind 'hf_classifier' needs reward.model (a hub id or a local directory)")
        if self.kind == "callable" and (not self.callable or ":" not in self.callable):
            raise ValueError("reward.kind 'callable' needs reward.callable as 'package.module:function'")
        return self


# `detoxflow generate` and the served model cut prompts longer than this (tokens).
GENERATE_MAX_QUERY_TOKENS = 512


class GenerationConfig(_Section):
    max_new_tokens: int = Field(48, ge=1, le=4096)
    min_new_tokens: int = Field(4, ge=0, description="EOS is banned before this many new tokens")
    do_sample: bool = Field(True, description="training rollouts must sample: false is refused (eval.greedy picks "
                            "greedy evaluation)")
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> GenerationConfig:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError("min_new_tokens must not exceed max_new_tokens")
        return self


class KLConfig(_Section):
    mode: Literal["adaptive", "fixed"] = "adaptive"
    init_coef: float = Field(0.2, ge=0.0)
    target: float = Field(6.0, gt=0.0, description="adaptive: target KL (nats per sequence)")
    horizon: int = Field(10_000, ge=1)
    estimator: Literal["k1", "k3"] = Field("k1", description="per-token KL in the reward")


class PPOConfig(_Section):
    backend: Literal["ppo", "rloo", "grpo"] = "ppo"
    steps: int = Field(20, ge=1, description="PPO steps (rollout batches)")
    batch_size: int = Field(16, ge=1)
    mini_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0, lt=1.0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    cliprange: float = Field(0.2, gt=0.0)
    cliprange_value: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)
    ent_coef: float = Field(0.0, ge=0.0)
    whiten_rewards: bool = False
    score_clip: float | None = Field(None, gt=0.0)
    length_penalty: float = Field(0.0, ge=0.0, description="length guard: subtracted from the score per token a "
                                  "response has below ppo.min_length (EOS not counted)")
    min_length: int = Field(0, ge=0, description="length guard threshold in tokens; with length_penalty > 0 it must "
                            "exceed generation.min_new_tokens (shorter responses cannot be sampled)")
    target_approx_kl: float | None = Field(
        None, gt=0.0,
        description="stop a step's PPO epochs after a mini-batch whose approx-KL 0.5*E[(log ratio)^2] exceeds it; "
        "None (default): off, every epoch runs (0.01-0.05 is a usual setting)",
    )
    kl: KLConfig = KLConfig()
    checkpoint_every: int = Field(5, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="newest checkpoints kept in <out>/checkpoints")
    num_generations: int = Field(2, ge=2, description="rloo/grpo: completions per prompt")

    @model_validator(mode="after")
    def _check(self) -> PPOConfig:
        if self.batch_size % self.mini_batch_size:
            raise ValueError("batch_size must be a multiple of mini_batch_size")
        if self.mini_batch_size % self.gradient_accumulation_steps:
            raise ValueError("mini_batch_size must be a multiple of gradient_accumulation_steps")
        if self.backend != "ppo" and self.batch_size % self.num_generations:
            # TRL groups every prompt's completions inside one generation batch (the leave-one-out / group baseline)
            raise ValueError(
                f"backend '{self.backend}' needs batch_size ({self.batch_size}) to be a multiple of "
                f"num_generations ({self.num_generations}), the completions per prompt"
            )
        return self


class EvalConfig(_Section):
    k_samples: int = Field(4, ge=1, description="sampled responses per prompt for expected max toxicity")
    greedy: bool = True
    batch_size: int = Field(32, ge=1)
    bootstrap_samples: int = Field(1000, ge=100)
    toxic_threshold: float = Field(0.5, gt=0.0, lt=1.0)
    n_table_samples: int = Field(10, ge=0)


class MonitorConfig(_Section):
    """Reward-hacking alarms: thresholds relative to the baseline (the policy before training)."""

    max_ref_ppl_ratio: float = Field(3.0, gt=1.0, description="reference perplexity of responses vs baseline")
    max_distinct2_drop: float = Field(0.3, gt=0.0, lt=1.0, description="relative drop of distinct-2")
    max_length_change: float = Field(0.3, gt=0.0, description="relative change of mean response length")
    max_top_token_share: float = Field(0.3, gt=0.0, le=1.0, description="share of all tokens taken by the 5 commonest")
    max_exaggeration_share: float = Field(0.2, ge=0.0, le=1.0, description="share of responses with gushing phrases")


class PromotionConfig(_Section):
    min_toxicity_drop: float = Field(0.2, ge=0.0, le=1.0, description="relative drop vs baseline to be promotable")
    min_improvement_over_champion: float = Field(0.0, ge=0.0, le=1.0)
    max_rouge_drop: float = Field(0.1, ge=0.0, le=1.0, description="relative ROUGE-L drop vs baseline")
    max_kl: float | None = Field(None, gt=0.0, description="None = 2x ppo.kl.target")
    max_length_change: float = Field(0.3, gt=0.0, description="relative change of mean response length vs baseline")
    require_no_alarms: bool = True


class TrackingConfig(_Section):
    uri: str | None = Field(None, description="None = $MLFLOW_TRACKING_URI, else SQLite under the work dir")
    experiment: str = "detoxflow"
    registered_model: str | None = Field(None, description="None = 'detoxflow-<name>'")


class OrchestrationConfig(_Section):
    mode: Literal["local", "team"] = Field("local", description="team: training runs as the train deployment on the gpu pool")
    train_deployment: str = "train/train-gpu"
    cache: bool = True
    poll_seconds: float = Field(2.0, gt=0.0, description="team: how often the pipeline polls the train deployment's run")
    train_timeout_s: float | None = Field(
        None, gt=0.0, description="team: give up waiting for the train run after this long (None = wait; training can take hours)"
    )
    train_processes: int = Field(
        1, ge=1, le=1024,
        description="data-parallel training processes (accelerate launch: gloo on CPU, NCCL with one GPU each); "
        "ppo.batch_size is per process",
    )


class Config(_Section):
    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    work_dir: str | None = Field(
        None, description="runs, checkpoints and the local MLflow store; unset: the detoxflow home (--home, "
        "$DETOXFLOW_HOME, the nearest .detoxflow/ above the working directory, else ~/.local/share/detoxflow)",
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    lora: LoraSection = LoraSection()
    reward: RewardConfig = RewardConfig()
    generation: GenerationConfig = GenerationConfig()
    ppo: PPOConfig = PPOConfig()
    eval: EvalConfig = EvalConfig()
    monitors: MonitorConfig = MonitorConfig()
    promotion: PromotionConfig = PromotionConfig()
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

    @model_validator(mode="after")
    def _check_sampling(self) -> Config:
        if not self.generation.do_sample:
            raise ValueError("generation.do_sample is false: training rollouts must be sampled (a greedy rollout "
                             "gives PPO no probability ratio to work with); set generation.do_sample=true, and "
                             "eval.greedy=true for greedy evaluation")
        if self.ppo.backend != "ppo" and (self.generation.top_k or self.generation.top_p < 1.0):
            raise ValueError(f"ppo.backend {self.ppo.backend} with generation.top_k/top_p: TRL scores tokens under "
                             "the unfiltered softmax, not the filtered one they are drawn from; set "
                             "generation.top_k=0 and generation.top_p=1.0, or use ppo.backend=ppo")
        if self.ppo.length_penalty > 0 and self.ppo.min_length <= self.generation.min_new_tokens:
            raise ValueError(f"ppo.length_penalty > 0 but ppo.min_length ({self.ppo.min_length}) <= "
                             f"generation.min_new_tokens ({self.generation.min_new_tokens}): the sampler never ends "
                             "a response that early, so the guard could not fire; raise ppo.min_length")
        if self.ppo.min_length > self.generation.max_new_tokens:
            raise ValueError(f"ppo.min_length ({self.ppo.min_length}) exceeds generation.max_new_tokens "
                             f"({self.generation.max_new_tokens}): every response would be penalised")
        return self

    @property
    def registered_model_name(self) -> str:
        return self.tracking.registered_model or f"detoxflow-{self.name}"

    def flat(self) -> dict[str, Any]:
        """Dotted-key params for MLflow: {'ppo.kl.target': 6.0, ...}."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]

    def section_digest(self, *sections: str) -> str:
        dump = self.model_dump(mode="json")
        return hashlib.sha256(json.dumps({s: dump[s] for s in sections}, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _format_error(err: dict[str, Any], origin: str) -> str:
    field = ".".join(str(p) for p in err["loc"]) or "<top level>"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        parent = err["loc"][:-1]
        allowed = _allowed_keys(parent)
        return f"{origin}: unknown field '{field}'. Allowed here: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a check across sections names its fields itself
        return f"{origin}: {msg}"
    shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{origin}: field '{field}' = {shown}: {msg}"


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        ann = model.model_fields[str(part)].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        else:
            return []
    return sorted(model.model_fields)


def set_dotted(d: dict[str, Any], dotted: str, value: Any, where: str | None = None) -> None:
    """``d['ppo']['kl']['target'] = value`` for ``dotted='ppo.kl.target'``; unknown keys are left to the schema.

    ``where`` starts the error message when a part of the path is a value, not a section (default
    ``override '<dotted>'``)."""
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            prefix = where if where is not None else f"override '{dotted}'"
            raise ConfigError(f"{prefix}: '{p}' is a value, not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """'ppo.steps=5' -> ('ppo.steps', 5); the value is parsed as YAML so numbers, bools, lists and null work."""
    if "=" not in item:
        raise ConfigError(f"override '{item}': expected the form section.field=value, e.g. ppo.steps=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}': the field name before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def config_from_dict(data: dict[str, Any], origin: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        lines = [_format_error(err, origin) for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        origin = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found. Pass an existing YAML file, e.g. configs/default.yaml")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, model:, ppo:, ...)")
        data = loaded
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return config_from_dict(data, origin)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
