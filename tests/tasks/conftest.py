"""Fixtures for task tests: an isolated digits cache, a tiny BERT directory, small data files."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest

POSITIVE = ["good", "great", "nice", "fine", "happy"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring"]
FILLER = ["the", "movie", "was", "is", "a", "plot", "film"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LORA_TUNE_CACHE pointed at a fresh directory for the whole session (pretrains once)."""
    path = tmp_path_factory.mktemp("lora-tune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_TUNE_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def digits_task(digits_cache: Path):
    """The digits task; its base is pretrained on one thread (see ``one_torch_thread``)."""
    import torch

    from lora_tune.tasks import build_task

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return build_task({"type": "digits"})
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT (no classifier head) and a WordPiece tokenizer saved to a directory."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer.from_pretrained(str(path)).save_pretrained(str(path))
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(path))
    return path


def sentiment_rows(n: int, seed: int) -> list[dict]:
    """Sentences whose label ('pos'/'neg') is given by the sentiment words they contain."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(FILLER, 3) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": label})
    return rows


def write_table(path: Path, rows: list[dict]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        return path
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    """A shared 2-core machine thrashes with more threads (see tests/conftest.py)."""
    yield


# -- sft: a chat tokenizer and small instruction data -----------------------------------------

CHAT_CORPUS = [
    "What is 12 plus 35? 47", "What is 9 minus 4? 5", "Reverse the words: red blue green",
    "green blue red", "What is the capital of France? Paris", "Spell backwards: cat tac",
    "You are a terse assistant. Answer with the answer only.", "Q: what is 2 plus 2?\nA: 4",
]


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with the tiny ChatML-like template (lora_tune.models.tiny_lm)."""
    from lora_tune.models.tiny_lm import build_chat_tokenizer

    path = tmp_path_factory.mktemp("chat-tokenizer")
    build_chat_tokenizer(CHAT_CORPUS * 5, path, vocab_size=300)
    return path


@pytest.fixture(scope="session")
def plain_tokenizer_dir(chat_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tokenizer without a chat template."""
    import shutil

    path = tmp_path_factory.mktemp("plain-tokenizer")
    for item in chat_tokenizer_dir.iterdir():
        if item.name != "chat_template.jinja":
            shutil.copy(item, path / item.name)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def sft_cache(tmp_path_factory: pytest.TempPathFactory):
    """LORA_TUNE_CACHE pointed at a fresh directory for one module (sft's scratch dataset caches)."""
    path = tmp_path_factory.mktemp("sft-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_TUNE_CACHE", str(path))
        yield path


@pytest.fixture(autouse=True)
def _artifacts_in_tmp(tmp_path, monkeypatch):
    """Studies in memory keep their adapters under the working directory by default; keep the
    tests' ones out of the checkout."""
    monkeypatch.setenv("LORA_TUNE_ARTIFACTS", str(tmp_path / "lora_tune_artifacts"))
