"""Shared fixtures. Environment first: Prefect analytics off (SQLite lock), no telemetry, no hub access."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OpenMP threads that spin while waiting make torch 5-10x slower on a shared 2-core machine (measured: the
# trainer's resume test 97 s -> 9 s); must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
import pytest

# Each test session has its own detoxflow home (state: runs, the local MLflow store), never the user's or another
# session's; a test that needs another sets DETOXFLOW_HOME, --home or work_dir itself.
_SESSION_HOME = tempfile.mkdtemp(prefix="detoxflow-home-")
os.environ["DETOXFLOW_HOME"] = _SESSION_HOME
atexit.register(shutil.rmtree, _SESSION_HOME, ignore_errors=True)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DIALOGSUM_DEV = PROJECT_ROOT.parent / "shared" / "data" / "dialogsum" / "dev.jsonl"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~15x faster than two (no spin contention).
    A module uses it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (each costs ~10 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _train_tokenizer(special: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rnd = random.Random(0)
    words = (
        "the customer wants a refund because the order arrived late and broken person one person two "
        "asks tells agrees meeting friday report manager doctor says idiot stupid thanks lovely summary"
    ).split()
    corpus = [" ".join(rnd.choice(words) for _ in range(rnd.randint(4, 20))) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
    return tok


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random-weight tiny T5 and GPT-2 saved with save_pretrained: {'t5': dir, 'gpt2': dir}.

    Loaded by tests through the same from_pretrained path a hub id would take."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny-models")
    t5_tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(["<pad>", "</s>", "<unk>"]), pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                 pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id,
                 decoder_start_token_id=t5_tok.pad_token_id)
    )
    t5.save_pretrained(root / "t5")
    t5_tok.save_pretrained(root / "t5")
    g_tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tokenizer(["<|endoftext|>", "<unk>"]),
        bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<unk>", pad_token="<|endoftext|>",
    )
    gpt = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(g_tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                   bos_token_id=g_tok.bos_token_id, eos_token_id=g_tok.eos_token_id)
    )
    gpt.save_pretrained(root / "gpt2")
    g_tok.save_pretrained(root / "gpt2")
    return {"t5": root / "t5", "gpt2": root / "gpt2"}
