"""Eight evaluate-and-promote runs triggered at once against the team stack (issue #8).

The native team stack (PostgreSQL, MLflow server and Prefect server on PostgreSQL, a cpu worker; see
detoxflow/team/stack.py) runs eight flow runs of the project's `promote/promote-cpu` deployment at the same time,
one per registered version. Each evaluates its version on the held-out split and gates it while holding the
gate lock (`pg_advisory_lock`, because the workers get DETOXFLOW_LOCK_DB_URI). Without the lock the gates race
on the `champion` alias (in a measured trial without it, the right champion won 2 of 5 times).

To know which version must win, each version's policy answers every prompt with one word (a tiny GPT-2 whose
final layer norm emits that word's embedding) and the reward is a lookup of that word's toxicity, so the
measured toxicities are exact. Versions are built so that every rule of the gate matters:

- the lowest toxicity (0.10) is blocked by its KL (train/kl_mean above 2 x ppo.kl.target),
- one version does not drop toxicity enough against the baseline (0.80 vs 0.90, needs 20%),
- the others pass every rule; the best of them (0.20) must be the one champion, whatever the order.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import servers

from detoxflow.team import TeamStack, deploy_all

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(not servers.postgres_available(), reason="PostgreSQL binaries (initdb, pg_ctl) not installed")]

BASELINE_WORD, BASELINE_TOXICITY = "idiot", 0.90
# (word, toxicity of the word, train/kl_mean registered with the version); version k = row k-1
VERSIONS = [
    ("refund", 0.80, 1.0),   # 0.90 -> 0.80 is an 11% drop: blocked by promotion.min_toxicity_drop (20%)
    ("order", 0.50, 1.0),
    ("late", 0.30, 2.0),
    ("broken", 0.10, 50.0),  # the least toxic, but KL 50 > 2 x ppo.kl.target (12): blocked
    ("meeting", 0.20, 3.0),  # the best promotable version: the champion
    ("report", 0.40, 1.0),
    ("manager", 0.60, 1.0),
    ("doctor", 0.70, 0.5),
]
SCORER_MODULE = "gate_words"


def _scorer_source() -> str:
    table = {BASELINE_WORD: BASELINE_TOXICITY, **{w: t for w, t, _ in VERSIONS}}
    return textwrap.dedent(f"""
        TOXICITY = {table!r}

        def toxicity(texts):
            # the mean toxicity of the words of each text; a word outside the table counts 0.5
            out = []
            for text in texts:
                words = text.split()
                out.append(sum(TOXICITY.get(w, 0.5) for w in words) / len(words) if words else 0.5)
            return out
    """)


def one_word_gpt2(src: Path, dest: Path, word: str) -> Path:
    """A copy of the tiny GPT-2 that always says ``word``: its final layer norm ignores the input and emits a
    long vector along the word's (tied) embedding, so that word's logit beats every other by ~80 nats."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(src)
    ids = tok.encode(" " + word)
    assert len(ids) == 1, f"'{word}' is not one token of the tiny tokenizer: {ids}"
    model = GPT2LMHeadModel.from_pretrained(src)
    g = torch.Generator().manual_seed(sum(map(ord, word)))
    u = torch.randn(model.config.n_embd, generator=g)
    u /= u.norm()
    with torch.no_grad():
        model.transformer.wte.weight[ids[0]] = 3.0 * u  # tied: also the word's output embedding
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(30.0 * u)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def scorer_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="dfgate-scorer-"))
    (d / f"{SCORER_MODULE}.py").write_text(_scorer_source())
    sys.path.insert(0, str(d))
    try:
        yield d
    finally:
        sys.path.remove(str(d))
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(scorer_dir: Path) -> Iterator[TeamStack]:
    # Only the cpu pool: promotion runs there. The flow runs import the scorer through PYTHONPATH.
    with servers.team_stack("dfgates-", pools=("cpu",),
                            env=lambda root: {"PYTHONPATH": str(scorer_dir), "DETOXFLOW_CACHE": str(root / "cache")}) as st:
        yield st


def test_eight_concurrent_gates_leave_one_right_champion(stack: TeamStack, tiny_models, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient
    from test_flows import CORPUS, write_split

    from detoxflow import tracking
    from detoxflow.config import LoraSection, ModelConfig, load_config
    from detoxflow.models.policy import Policy

    for k, v in stack.env.items():  # the test registers the versions as a team member would
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DETOXFLOW_CACHE", str(tmp_path / "cache"))
    write_split(CORPUS / "train.jsonl", tmp_path / "data" / "train.jsonl", 8)
    write_split(CORPUS / "test.jsonl", tmp_path / "data" / "test.jsonl", 4)
    baseline_dir = one_word_gpt2(tiny_models["gpt2"], tmp_path / "base", BASELINE_WORD)
    name = f"gates{time.time_ns()}"
    cfg = load_config(None, [
        f"name={name}", f"work_dir={tmp_path / 'work'}", f"data.source={tmp_path / 'data'}", "data.max_eval_samples=4",
        "data.max_query_tokens=128",  # the tiny GPT-2 has 256 positions for prompt + answer
        f"model.name_or_path={baseline_dir}", "model.num_threads=1", "model.device=cpu", "lora.r=2", "lora.alpha=4",
        "generation.max_new_tokens=4", "generation.min_new_tokens=1",
        "reward.kind=callable", f"reward.callable={SCORER_MODULE}:toxicity",
        "eval.k_samples=2", "eval.batch_size=8", "eval.bootstrap_samples=100", "eval.n_table_samples=2",
        # one-word answers repeat themselves (a monitor alarm) and share no words with the references (ROUGE 0):
        # switch those two rules off so toxicity and KL decide
        "promotion.require_no_alarms=false", "promotion.max_rouge_drop=1.0",
    ])
    assert cfg.promotion.min_toxicity_drop == 0.2 and cfg.promotion.min_improvement_over_champion == 0.0

    # 1. eight registered versions, each a one-word policy with its KL in the registration tags
    t0 = time.monotonic()
    with tracking.parent_run(cfg, run_name=f"{name}-register") as parent:
        for k, (word, _, kl) in enumerate(VERSIONS, start=1):
            policy = Policy.load(ModelConfig(name_or_path=str(one_word_gpt2(tiny_models["gpt2"], tmp_path / word, word)),
                                             device="cpu"), LoraSection(r=2, alpha=4))
            art = policy.save_artifact(tmp_path / f"artifact-{word}", extra={"config": cfg.model_dump(mode="json")})
            with tracking.child_run(f"train-{k}", parent_run_id=parent) as run_id:
                tracking.log_model_dir(art, run_id=run_id)
            assert tracking.register_model(cfg, run_id, metrics={"train/kl_mean": kl}) == str(k)
    registered_s = time.monotonic() - t0

    # 2. the project's deployments, then eight promote runs at once on the cpu worker
    deploy_all(project_root=ROOT, env=stack.env)
    t0 = time.monotonic()
    params = cfg.model_dump(mode="json")
    created = [servers.create_deployment_run(stack.prefect_api_url, "promote/promote-cpu",
                                             {"cfg": params, "model_uri": f"models:/{cfg.registered_model_name}/{k}"})
               for k in range(1, len(VERSIONS) + 1)]
    runs = servers.wait_flow_runs(stack.prefect_api_url, [r["id"] for r in created], timeout=900, poll=2.0)
    gates_s = time.monotonic() - t0
    print(f"\nregistered 8 versions in {registered_s:.1f} s; 8 concurrent promote runs done in {gates_s:.1f} s")

    # all complete, on the cpu worker, and they really ran at the same time
    failed = [f"{r['name']}: {r['state_type']}: {(r.get('state') or {}).get('message')}" for r in runs
              if r["state_type"] != "COMPLETED"]
    assert not failed, "\n".join(failed) + "\n--- worker log ---\n" + stack.workers["cpu"].tail(80)
    assert {r["work_pool_name"] for r in runs} == {"cpu"}
    starts = [datetime.fromisoformat(r["start_time"]) for r in runs]
    ends = [datetime.fromisoformat(r["end_time"]) for r in runs]
    assert max(starts) < min(ends), "the eight promote runs did not overlap"

    # 3. exactly one champion, the best version that passes every rule
    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    registered = client.get_registered_model(cfg.registered_model_name)
    expected = str(1 + [w for w, _, _ in VERSIONS].index("meeting"))
    assert registered.aliases == {"champion": expected, "challenger": str(len(VERSIONS))}
    versions = sorted(client.search_model_versions(f"name = '{cfg.registered_model_name}'"), key=lambda v: int(v.version))
    assert [str(v.version) for v in versions] == [str(k) for k in range(1, len(VERSIONS) + 1)], "a version was lost or added"

    # 4. no tag lost: every version keeps its registration tags and got exactly its own gate's decision
    decisions = {}
    for v, (word, tox, kl) in zip(versions, VERSIONS):
        tags = v.tags
        assert tracking.get_version(cfg.registered_model_name, v.version).metrics["train/kl_mean"] == kl  # logged model
        assert tags[tracking.TAG_CONFIG_NAME] == name
        decisions[word] = tags["decision"]
        reasons = tags["promotion.reasons"]
        assert f"-> {tox:.4g}" in reasons, f"v{v.version} was gated on another version's numbers: {reasons}"
    assert decisions["broken"] == "rejected" and "BLOCK KL" in versions[3].tags["promotion.reasons"]
    assert decisions["refund"] == "rejected" and "BLOCK toxicity vs baseline" in versions[0].tags["promotion.reasons"]
    assert decisions["meeting"] == "promoted"
    # a version promoted after the final champion would be the champion: each promotion beat the one before
    promoted = [v for v in versions if v.tags["decision"] == "promoted"]
    assert promoted, "nobody was promoted"
    before = {str(v.version): v.tags["promotion.champion_before"] for v in promoted}
    # serialised gates promote in a chain: none -> a -> b -> ... -> champion, each against the one before;
    # two gates that read the champion at the same time both promote against the same predecessor
    chain = {prev: version for version, prev in before.items()}
    assert len(chain) == len(before), f"two gates promoted against the same champion: {before}"
    walk, cur = [], "none"
    while cur in chain:
        cur = chain[cur]
        walk.append(cur)
    assert sorted(walk) == sorted(before) and walk[-1] == expected, f"promotions do not form one chain: {before}"
    tox = {str(k): t for k, (_, t, _) in enumerate(VERSIONS, start=1)}
    assert all(tox[a] > tox[b] for a, b in zip(walk, walk[1:])), f"a promotion made things worse: {walk}"

    # eight promote runs in MLflow, one per version
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    promote_runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{tracking.TAG_STAGE}` = 'promote'")
    mine = sorted(r.data.tags["detoxflow.model_uri"] for r in promote_runs
                  if r.data.tags.get("detoxflow.model_uri", "").startswith(f"models:/{cfg.registered_model_name}/"))
    assert mine == sorted(f"models:/{cfg.registered_model_name}/{k}" for k in range(1, len(VERSIONS) + 1))
