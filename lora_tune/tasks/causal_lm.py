"""``causal-lm``: a Hugging Face decoder language model on plain text files.

Spec keys::

    type: causal-lm
    model: path/to/gpt2-dir           # a local HF directory or a hub id already cached locally,
    # model: {gpt2_config: {n_layer: 2, n_embd: 64, n_head: 2}}   # or a GPT-2 built from a config
    tokenizer: bytes                  # optional: a tokenizer directory, or 'bytes' (UTF-8 bytes as ids);
                                      # default: the model directory's tokenizer, 'bytes' for gpt2_config
    train_file: corpus.txt            # one file or a list of files
    eval_file: held_out.txt           # optional; else the last eval_fraction of the blocks
    eval_fraction: 0.1
    block_size: 128                   # tokens per training example
    max_train_blocks: 2000            # optional caps
    max_eval_blocks: 200
    seed: 0                           # initialisation of a gpt2_config model

The text is tokenized once and cut into consecutive full blocks of ``block_size`` tokens (the
tail shorter than a block is dropped). Metrics: ``eval_loss`` (mean next-token cross-entropy,
default, minimize) and ``perplexity`` (``exp(eval_loss)``). A model built from ``gpt2_config``
is randomly initialised (seeded); it exists so tests and demos need no downloaded weights.
The loss never holds full-vocabulary logits (chunked over positions, :mod:`lora_tune.tasks.lm_loss`).
"""
from __future__ import annotations

import math
from typing import Any
from collections.abc import Iterator, Mapping

import torch

from lora_tune.errors import ConfigError
from lora_tune.tasks.base import (
    Field, ModelTemplate, Problems, Task, check_spec, eval_mode, index_batches, is_choice, is_existing_file,
    is_fraction, is_int, model_device, perplexity,
)
from lora_tune.tasks.data_files import read_text
from lora_tune.tasks.hf import MODEL_LOAD, TOKENIZER_LOAD, check_model_ref, quiet_transformers, resolve_model_ref
from lora_tune.tasks.lm_loss import next_token_loss, split_reproduces_logits

# Libraries a trial's child process needs: its fork server imports them once (study/trial/trial_process.py).
HEAVY_IMPORTS = ("transformers", "transformers.modeling_utils")

BYTE_VOCAB = 256
GPT2_INT_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner")
GPT2_FLOAT_KEYS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "layer_norm_epsilon", "initializer_range")
GPT2_KEYS = GPT2_INT_KEYS + GPT2_FLOAT_KEYS + ("activation_function",)


def _check_model(value: Any) -> str | None:
    if isinstance(value, Mapping):
        if set(value) != {"gpt2_config"} or not isinstance(value.get("gpt2_config"), Mapping):
            return "a mapping model must be {gpt2_config: {n_layer: ..., n_embd: ..., ...}}"
        return None
    return check_model_ref(value)


def _gpt2_problems(config: Mapping) -> Problems:
    path = "task.model.gpt2_config"
    problems: Problems = []
    for key, value in config.items():
        if key not in GPT2_KEYS:
            problems.append((f"{path}.{key}", "unknown key; allowed: " + ", ".join(GPT2_KEYS)))
        elif key in GPT2_INT_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append((f"{path}.{key}", f"must be an integer >= 1, got {value!r}"))
        elif key in GPT2_FLOAT_KEYS and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            problems.append((f"{path}.{key}", f"must be a number >= 0, got {value!r}"))
    n_embd, n_head = config.get("n_embd", 768), config.get("n_head", 12)
    if isinstance(n_embd, int) and isinstance(n_head, int) and n_head > 0 and n_embd % n_head:
        problems.append((f"{path}.n_embd", f"must be a multiple of n_head ({n_head}), got {n_embd}"))
    return problems


def _check_tokenizer(value: Any) -> str | None:
    return None if value == "bytes" else check_model_ref(value)


FIELDS = {
    "type": Field(is_choice(("causal-lm",)), required=True),
    "model": Field(_check_model, required=True, help="a local model directory or {gpt2_config: {...}}"),
    "tokenizer": Field(_check_tokenizer),
    "train_file": Field(is_existing_file(many=True), required=True, help="a text file or a list of text files"),
    "eval_file": Field(is_existing_file(many=True)),
    "eval_fraction": Field(is_fraction),
    "block_size": Field(is_int(2)),
    "max_train_blocks": Field(is_int(1)),
    "max_eval_blocks": Field(is_int(1)),
    "seed": Field(is_int(0)),
}


def validate_spec(spec: Any) -> Problems:
    problems = check_spec(spec, FIELDS)
    if isinstance(spec, Mapping):
        model = spec.get("model")
        if isinstance(model, Mapping) and isinstance(model.get("gpt2_config"), Mapping):
            gpt2 = model["gpt2_config"]
            problems += _gpt2_problems(gpt2)
            if spec.get("tokenizer", "bytes") == "bytes" and isinstance(gpt2.get("vocab_size"), int) \
                    and gpt2["vocab_size"] < BYTE_VOCAB:
                problems.append(("task.model.gpt2_config.vocab_size",
                                 f"must be >= {BYTE_VOCAB} with the byte tokenizer, got {gpt2['vocab_size']}"))
        if spec.get("eval_file") is not None and spec.get("eval_fraction") is not None:
            problems.append(("task.eval_fraction", "give either eval_file or eval_fraction, not both"))
    return problems


class ByteTokenizer:
    """UTF-8 bytes as token ids (0-255)."""

    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


def _build_model(spec: dict, tokenizer_vocab: int | None) -> tuple[torch.nn.Module, str]:
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    model_spec = spec["model"]
    if isinstance(model_spec, Mapping):
        config = dict(model_spec["gpt2_config"])
        config.setdefault("vocab_size", tokenizer_vocab or BYTE_VOCAB)
        config.setdefault("n_positions", max(int(spec.get("block_size") or 128), 128))
        config.setdefault("bos_token_id", None)  # GPT-2's 50256 is outside a byte vocabulary
        config.setdefault("eos_token_id", None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec.get("seed") or 0))
            return GPT2LMHeadModel(GPT2Config(**config)), "gpt2_config"
    ref = resolve_model_ref(model_spec)
    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(ref, **MODEL_LOAD), ref


def _tokenize(text: str, spec: dict) -> tuple[list[int], Any]:
    tok_spec = spec.get("tokenizer")
    if tok_spec is None:
        tok_spec = "bytes" if isinstance(spec["model"], Mapping) else spec["model"]
    if tok_spec == "bytes":
        tokenizer: Any = ByteTokenizer()
        return tokenizer.encode(text), tokenizer
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_ref(tok_spec), **TOKENIZER_LOAD)
        return tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer


def _blocks(ids: list[int], block_size: int, limit: int | None, field: str) -> torch.Tensor:
    n = len(ids) // block_size
    if n == 0:
        raise ConfigError(field, f"{len(ids)} tokens", f"text of at least block_size = {block_size} tokens")
    if limit:
        n = min(n, limit)
    return torch.tensor(ids[:n * block_size], dtype=torch.long).view(n, block_size)


class CausalLMTask(Task):
    """See the module docstring."""

    name = "causal-lm"
    metrics = ("eval_loss", "perplexity")
    default_metric = "eval_loss"
    default_direction = "minimize"
    baseline_targets = "attention-qv"

    def __init__(self, spec: dict):
        self.block_size = int(spec.get("block_size") or 128)
        train_ids, tokenizer = _tokenize(read_text(spec["train_file"], "task.train_file"), spec)
        vocab = int(getattr(tokenizer, "vocab_size", 0) or 0) or None
        if tokenizer is not None and hasattr(tokenizer, "__len__"):
            vocab = max(vocab or 0, len(tokenizer))
        model, self.model_ref = _build_model(spec, vocab)
        positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        if positions and self.block_size > positions:
            raise ConfigError("task.block_size", self.block_size, f"at most the model's {positions} positions")
        if spec.get("eval_file") is not None:
            eval_ids, _ = _tokenize(read_text(spec["eval_file"], "task.eval_file"), spec)
            self.train = _blocks(train_ids, self.block_size, spec.get("max_train_blocks"), "task.train_file")
            self.eval = _blocks(eval_ids, self.block_size, spec.get("max_eval_blocks"), "task.eval_file")
        else:
            all_blocks = _blocks(train_ids, self.block_size, None, "task.train_file")
            fraction = float(spec.get("eval_fraction") or 0.1)
            n_eval = max(1, round(len(all_blocks) * fraction))
            if len(all_blocks) - n_eval < 1:
                raise ConfigError("task.train_file", f"{len(all_blocks)} blocks",
                                  "text long enough for at least one training and one evaluation block",
                                  "Give a longer text, a smaller block_size, or an eval_file.")
            self.train = all_blocks[:-n_eval][:spec.get("max_train_blocks") or None]
            self.eval = all_blocks[-n_eval:][:spec.get("max_eval_blocks") or None]
        embeddings = model.get_input_embeddings().num_embeddings
        top = int(max(self.train.max(), self.eval.max()))
        if top >= embeddings:
            raise ConfigError("task.tokenizer", spec.get("tokenizer"), f"a tokenizer whose ids fit the model's "
                              f"{embeddings} embeddings", f"token id {top} is out of range")
        self.modules_to_save: list[str] = []
        self.lm_split = split_reproduces_logits(model)  # chunked loss without full logits (tasks/lm_loss.py)
        self.template = ModelTemplate(model)
        self.resident = self.template.resident

    def build_model(self) -> torch.nn.Module:
        return self.template.fresh()

    def num_train_examples(self) -> int:
        return len(self.train)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[torch.Tensor]:
        for idx in index_batches(len(self.train), batch_size, seed, epoch):
            yield self.train[idx]

    def token_loss(self, model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Summed next-token cross-entropy over a batch of blocks, and the number of targets."""
        return next_token_loss(model, {"input_ids": batch, "use_cache": False}, batch, split=self.lm_split)

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        total, count = self.token_loss(model, batch)
        return total / max(count, 1)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        device = model_device(model)
        total, count = 0.0, 0
        with eval_mode(model):
            for start in range(0, len(self.eval), batch_size):
                summed, n = self.token_loss(model, self.eval[start:start + batch_size].to(device))
                total += float(summed)
                count += n
        eval_loss = total / count
        if not math.isfinite(eval_loss):
            eval_loss = float("inf")
        return {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_ref, "block_size": self.block_size,
                "train_blocks": len(self.train), "eval_blocks": len(self.eval)}


def build(spec: dict) -> CausalLMTask:
    return CausalLMTask(spec)
