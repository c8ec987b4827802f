"""The config schema: profiles load, overrides apply, and every bad input names the dotted field and exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from detoxflow.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("profile", ["default", "causal", "causal-llama", "lab-flan-t5"])
def test_profiles_load(profile: str) -> None:
    cfg = load_config(ROOT / "configs" / f"{profile}.yaml")
    assert cfg.name == profile


def test_lab_profile_matches_the_course_lab() -> None:
    cfg = load_config(ROOT / "configs/lab-flan-t5.yaml")
    assert cfg.model.name_or_path == "google/flan-t5-base"
    assert cfg.data.source == "hf:knkarthick/dialogsum"
    assert cfg.reward.model == "facebook/roberta-hate-speech-dynabench-r4-target"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (32, 32, ["q", "v"])
    assert (cfg.ppo.learning_rate, cfg.ppo.batch_size, cfg.ppo.mini_batch_size) == (1.41e-5, 16, 4)
    assert (cfg.ppo.kl.mode, cfg.ppo.kl.init_coef, cfg.ppo.kl.target) == ("adaptive", 0.2, 6.0)


def test_overrides_parse_as_yaml_values() -> None:
    cfg = load_config(ROOT / "configs/default.yaml", ["ppo.steps=3", "ppo.kl.mode=fixed", "lora.target_modules=[q,k]"])
    assert cfg.ppo.steps == 3 and cfg.ppo.kl.mode == "fixed" and cfg.lora.target_modules == ["q", "k"]
    assert cfg.flat()["ppo.kl.mode"] == "fixed"


def test_digest_changes_with_content() -> None:
    a = load_config(ROOT / "configs/default.yaml")
    b = load_config(ROOT / "configs/default.yaml", ["ppo.steps=3"])
    assert a.digest() != b.digest()
    assert a.section_digest("data") == b.section_digest("data")


@pytest.mark.parametrize(
    ("yaml_text", "overrides", "expected"),
    [
        ("ppo:\n  stepz: 3\n", [], ["ppo.stepz", "unknown field", "steps"]),
        ("ppo:\n  steps: many\n", [], ["ppo.steps", '"many"', "integer"]),
        ("ppo:\n  cliprange: -1\n", [], ["ppo.cliprange", "-1", "greater than 0"]),
        ("lora:\n  r: 0\n", [], ["lora.r", "greater than or equal to 1"]),
        ("model:\n  arch: rnn\n", [], ["model.arch", "rnn", "seq2seq"]),
        ("", ["model.name_or_path=embedded:bert"], ["model.name_or_path", "embedded:bert", "embedded:llama"]),
        ("", ["ppo.kl.target=0"], ["ppo.kl.target", "greater than 0"]),
        ("ppo:\n  batch_size: 10\n  mini_batch_size: 4\n", [], ["ppo", "multiple of mini_batch_size"]),
        ("data:\n  prompt_template: 'Summarise:'\n", [], ["data", "{dialogue}"]),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, yaml_text: str, overrides: list[str], expected: list[str]) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides)
    for part in expected:
        assert part in str(e.value), (part, str(e.value))


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("configs/does-not-exist.yaml")


def test_not_a_mapping(tmp_path: Path) -> None:
    f = tmp_path / "list.yaml"
    f.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(f)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detoxflow.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_bad_config_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("ppo:\n  steps: -4\n")
    r = _cli("run", "--config", str(f), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "ppo.steps" in r.stderr and "-4" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_cli_missing_config_exits_2(tmp_path: Path) -> None:
    r = _cli("config", "show", "--config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr


def test_cli_config_show_resolves_overrides(tmp_path: Path) -> None:
    r = _cli("config", "show", "--config", str(ROOT / "configs/causal.yaml"), "--set", "ppo.steps=7", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "steps: 7" in r.stdout and "embedded:gpt2" in r.stdout


def test_cli_refuses_greedy_rollouts_in_one_line(tmp_path: Path) -> None:
    """PPO's ratio compares probabilities of sampled tokens: a greedy rollout gives it nothing; refused at load."""
    r = _cli("config", "show", "--config", str(ROOT / "configs/default.yaml"), "--set", "generation.do_sample=false",
             cwd=tmp_path)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "generation.do_sample is false" in line and "generation.do_sample=true" in line


@pytest.mark.parametrize(("overrides", "message"), [
    (["ppo.length_penalty=0.1"], r"ppo.min_length \(0\) <= generation.min_new_tokens \(4\)"),
    (["ppo.length_penalty=0.1", "ppo.min_length=4"], r"the guard could not fire; raise ppo.min_length"),
    (["ppo.min_length=49"], r"ppo.min_length \(49\) exceeds generation.max_new_tokens \(48\)"),
    (["ppo.backend=grpo", "generation.top_p=0.9"], r"TRL scores tokens under the unfiltered softmax"),
])
def test_sampling_settings_that_cannot_work_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)
    # the working neighbours load
    load_config(None, ["ppo.length_penalty=0.1", "ppo.min_length=5"])
    load_config(None, ["ppo.backend=grpo", "generation.top_p=1.0"])
