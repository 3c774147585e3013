"""``sft``: supervised fine-tuning of a decoder LLM on instruction or chat data.

Spec keys (checked in :mod:`lora_tune.tasks.sft_spec`, defaults in :class:`SFTSettings`)::

    type: sft
    model: path/to/hf-decoder-dir        # any AutoModelForCausalLM directory (loaded offline), or
    # model: {config: {model_type: llama, hidden_size: 64, intermediate_size: 128,
    #                  num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}}
    tokenizer: path/to/tokenizer-dir     # default: the model directory (required with config:)
    train_file: data/train.jsonl         # .jsonl .json .csv .tsv .parquet, or a save_to_disk directory
    eval_file: data/eval.jsonl           # or eval_fraction: 0.1 (a seeded split of train_file)
    format: messages                     # messages | prompt-completion | text; detected when omitted
    messages_column: messages            # [{role: system|user|assistant|tool, content: ...}, ...]
    prompt_column: prompt
    completion_column: completion
    text_column: text
    chat_template: null                  # default: the tokenizer's; or a Jinja string or file path
    max_length: 512                      # longer examples are left out (and counted)
    train_on: completion                 # completion (assistant turns) | all; text is always all
    packing: false                       # concatenate training examples into max_length blocks
    dtype: auto                          # auto | bfloat16 | float16 | float32: the weights as loaded
    max_train_examples: null             # seeded random subsets
    max_eval_examples: null
    seed: 0                              # config: initialisation, eval_fraction split, subsets, packing
    generate:                            # optional generation metric (lora_tune.tasks.generation)
      max_new_tokens: 32
      metric: exact_match                # exact_match | contains | package.module:function
      max_examples: null

Which tokens are supervised, and how, is documented in :mod:`lora_tune.tasks.chat_data`.
Metrics: ``eval_loss`` (cross-entropy summed over every supervised evaluation token and divided
by their number, so long answers weigh more than short ones; default, minimize), ``perplexity``
(its exp) and the generation metric when ``generate`` is given. A ``config:`` model is randomly
initialised under ``seed`` (any ``model_type`` with a causal-LM class; vocabulary size and
pad/bos/eos ids default to the tokenizer's); it exists so tests and demos need no download.

**Packing.** Examples are concatenated whole, in a seeded order, into blocks of at most
``max_length`` tokens, each keeping its own labels; positions restart at 0 at every example and
the model is called with ``position_ids`` and no attention mask, from which transformers builds a
block-diagonal causal mask (flash-attention uses the same positions for variable-length kernels).
Whether the model really keeps examples apart is measured once, on the first base with weights; a model
that does not (e.g. OPT, whose positions come from the attention mask) is trained with examples
attending across block boundaries, and :attr:`SFTTask.warnings` says so. Evaluation never packs.

**Loss.** The loss never holds full-vocabulary logits: the model's body gives the final hidden
states, those of the supervised positions are gathered, and the output layer and the
cross-entropy run over them in checkpointed chunks of rows (:mod:`lora_tune.tasks.lm_loss`; same
values as the full-logits computation). A model whose body and head do not reproduce its logits
(checked once, on the first base with weights, :attr:`SFTTask.lm_split`) is trained on full logits.

**Base.** A model directory is read as its structure only when the task is built (no weights);
each trial leases the resident base (:mod:`lora_tune.tasks.resident`), which the streaming loader
builds once per base variant: with ``quant_bits`` 4 or 8 every Linear but the output head and
``modules_to_save`` is quantized as it is read, as transformers' bitsandbytes loading does.

Beyond the Task protocol the task has ``batch_tokens(batch)`` (non-padding input tokens, for
tokens/s), ``loss_weight(batch)`` (the supervised tokens ``loss`` averages over, so gradient
accumulation weighs micro-batches by tokens), ``weight_dtype`` (the dtype the weights were loaded
in) and ``warnings`` (examples left out, content-only turns, packing that mixes examples; also
logged). Batches are right-padded to their own longest row, and the model is always called with
``use_cache=False`` (the config's ``use_cache`` is off too), which gradient checkpointing needs.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import torch

from lora_tune.errors import ConfigError
from lora_tune.models.tiny_lm import causal_lm_from_config, special_token_ids
from lora_tune.tasks.base import ModelTemplate, Task, cache_dir, eval_mode, index_batches, model_device, perplexity
from lora_tune.tasks.chat_data import (
    IGNORE, Block, Example, Renderer, Split, Table, detect_format, encode_table, pack, read_table,
)
from lora_tune.tasks.generation import GenerationEval, Scorer, resolve_scorer
from lora_tune.tasks.hf import TOKENIZER_LOAD, quiet_transformers, resolve_model_ref
from lora_tune.tasks.lm_loss import next_token_loss, split_reproduces_logits
from lora_tune.tasks.resident import directory_base
from lora_tune.tasks.sft_spec import DTYPES, SFTSettings, is_inline_template, validate_spec

# Libraries a trial's child process needs: its fork server imports them once (study/trial/trial_process.py).
HEAVY_IMPORTS = ("transformers", "transformers.modeling_utils", "datasets")

__all__ = ["SFTSettings", "SFTTask", "build", "collate", "packing_isolates", "validate_spec"]

log = logging.getLogger(__name__)


# -- building -------------------------------------------------------------------------------

def _load_tokenizer(settings: SFTSettings) -> Any:
    from transformers import AutoTokenizer

    ref = settings.tokenizer or settings.model
    key = "task.tokenizer" if settings.tokenizer else "task.model"
    local = Path(str(ref)).expanduser()
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(local) if local.is_dir() else resolve_model_ref(ref),
                                                      **TOKENIZER_LOAD)
        except (OSError, ValueError, LookupError) as exc:
            raise ConfigError(key, ref, "a directory holding a Hugging Face tokenizer", str(exc)) from None
    if not tokenizer.is_fast:
        raise ConfigError(key, ref, "a fast tokenizer (a tokenizer.json): labels need character offsets")
    return tokenizer


def _chat_template(settings: SFTSettings, tokenizer: Any) -> str | None:
    value = settings.chat_template
    if value is None:
        return getattr(tokenizer, "chat_template", None) or None
    if is_inline_template(value):
        return value
    return Path(value).expanduser().read_text(encoding="utf-8")


def _subset(rows: list, limit: int | None, seed: int) -> list:
    """A seeded random subset of ``limit`` rows, in file order (all rows without a limit)."""
    if not limit or limit >= len(rows):
        return rows
    chosen = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit]
    return [rows[i] for i in sorted(chosen.tolist())]


def _tables(settings: SFTSettings) -> tuple[Table, Table]:
    train = read_table(str(settings.train_file), "task.train_file")
    if settings.eval_file is not None:
        held_out = read_table(str(settings.eval_file), "task.eval_file")
    else:
        order = torch.randperm(len(train.rows), generator=torch.Generator().manual_seed(settings.seed)).tolist()
        n_eval = max(1, round(len(train.rows) * settings.eval_fraction))
        if len(train.rows) - n_eval < 1:
            raise ConfigError("task.train_file", f"{len(train.rows)} rows", "at least two rows with eval_fraction",
                              "Give more data or an eval_file.")
        held_out = Table(train.source, train.field, train.columns, [train.rows[i] for i in sorted(order[-n_eval:])])
        train = Table(train.source, train.field, train.columns, [train.rows[i] for i in sorted(order[:-n_eval])])
    for table in (train, held_out):
        if not table.rows:
            raise ConfigError(table.field, table.source, "a data file with at least one row")
    limits = ((train, settings.max_train_examples, settings.seed),
              (held_out, settings.max_eval_examples, settings.seed + 1))
    return tuple(Table(t.source, t.field, t.columns, _subset(t.rows, n, s)) for t, n, s in limits)


def _resolve_format(settings: SFTSettings, template: str | None, train: Table, held_out: Table) -> tuple[str, str]:
    """The data format (given or detected; both files must fit it) and what to supervise."""
    fmt = detect_format(train, settings.columns, settings.format)
    detect_format(held_out, settings.columns, fmt)
    if fmt == "messages" and template is None:
        raise ConfigError("task.chat_template", None, "a Jinja chat template (a string or a file path)",
                          "format messages needs one and the tokenizer has none")
    if fmt == "text" and settings.train_on == "completion":
        raise ConfigError("task.train_on", "completion", "all (or leave it out) for format text",
                          f"{train.source!r} was detected as format text")
    if fmt == "text" and settings.generate is not None:
        raise ConfigError("task.generate", "(given)", "format messages or prompt-completion",
                          f"{train.source!r} was detected as format text, which has no prompts")
    return fmt, settings.train_on or ("all" if fmt == "text" else "completion")


def _load_model(settings: SFTSettings, tokenizer: Any) -> tuple[torch.nn.Module, str | None]:
    """A model built from ``model: {config: ...}`` (in memory, random weights) and None, or the
    structure of the model directory (weights on the meta device, none read) and its path."""
    dtype = DTYPES[settings.dtype]
    if isinstance(settings.model, Mapping):
        keys = {"vocab_size": len(tokenizer), **special_token_ids(tokenizer), **settings.model["config"]}
        with quiet_transformers():
            try:
                model = causal_lm_from_config(keys, seed=settings.seed)
            except (TypeError, ValueError) as exc:
                raise ConfigError("task.model.config", dict(settings.model["config"]),
                                  "config keys transformers accepts for this model_type", str(exc)) from None
        return (model.to(dtype) if dtype is not None else model), None
    from lora_tune.tasks.base_loader import empty_model

    ref = resolve_model_ref(settings.model)
    with quiet_transformers():
        return empty_model(ref, "AutoModelForCausalLM", dtype), ref


def _check_fits(model: torch.nn.Module, settings: SFTSettings, splits: Sequence[Split]) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and settings.max_length > positions:
        raise ConfigError("task.max_length", settings.max_length, f"at most the model's {positions} positions")
    embeddings = model.get_input_embeddings().num_embeddings
    top = max(max(e.input_ids) for split in splits for e in split.examples)
    if top >= embeddings:
        raise ConfigError("task.tokenizer", settings.tokenizer or settings.model,
                          f"a tokenizer whose ids fit the model's {embeddings} embeddings",
                          f"token id {top} is out of range")


def packing_isolates(model: torch.nn.Module) -> bool:
    """Whether ``model`` keeps packed examples apart when given restarting ``position_ids`` and no
    attention mask: the logits of a second packed example equal those of it alone."""
    vocab = model.get_input_embeddings().num_embeddings
    first, second = torch.arange(5) % vocab, (torch.arange(3) + 5) % vocab
    packed = torch.cat([first, second])[None]
    positions = torch.cat([torch.arange(5), torch.arange(3)])[None]
    with eval_mode(model):
        alone = model(input_ids=second[None], use_cache=False).logits.float()
        inside = model(input_ids=packed, position_ids=positions, use_cache=False).logits[:, 5:].float()
    tolerance = 1e-4 if next(model.parameters()).dtype == torch.float32 else 3e-2
    return bool((inside - alone).abs().max() <= tolerance * max(1.0, float(alone.abs().max())))


def collate(rows: Sequence[Example | Block], pad_id: int, with_positions: bool) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` (IGNORE on padding) of the rows, and
    ``position_ids`` of packed blocks (their padding counts as one more example)."""
    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
        if with_positions:
            position_ids[i, :n] = torch.tensor(row.position_ids)
            position_ids[i, n:] = torch.arange(width - n)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if with_positions:
        batch["position_ids"] = position_ids
    return batch


# -- the task -------------------------------------------------------------------------------

class SFTTask(Task):
    """See the module docstring."""

    name = "sft"
    default_metric = "eval_loss"
    default_direction = "minimize"
    baseline_targets = "attention-qv"

    def __init__(self, spec: Mapping[str, Any]):
        self.settings = settings = SFTSettings.from_spec(spec)
        self.modules_to_save: list[str] = []
        self.warnings: list[str] = []
        scorer = resolve_scorer(settings.generate.metric) if settings.generate else None  # fail before loading
        self.tokenizer = _load_tokenizer(settings)
        template = _chat_template(settings, self.tokenizer)
        train_table, eval_table = _tables(settings)
        self.format, self.train_on = _resolve_format(settings, template, train_table, eval_table)
        self.renderer = Renderer(self.tokenizer, template if self.format != "text" else None, self.train_on)
        self.train = self._encode(train_table)
        self.eval = self._encode(eval_table)
        model, ref = _load_model(settings, self.tokenizer)
        self.model_ref = ref or f"config:{settings.model['config']['model_type']}"
        model.config.use_cache = False
        _check_fits(model, settings, (self.train, self.eval))
        self.weight_dtype: torch.dtype = next(model.parameters()).dtype
        self.pad_id = special_token_ids(self.tokenizer).get("pad_token_id", 0)
        self.blocks: list[Block] | None = None
        self.packing_isolated = False
        self.lm_split: bool | None = None  # probed on the first model with weights (_probe)
        self.generation = self._generation(model, scorer) if scorer else None
        self.metrics = ("eval_loss", "perplexity") + ((self.generation.scorer.name,) if self.generation else ())
        self.eval_order = sorted(range(len(self.eval.examples)), key=lambda i: -len(self.eval.examples[i].input_ids))
        self._structure = model  # a model directory's: its weights on the meta device
        if ref is None:  # built in memory: kept as a template, quantized per trial at inject
            self.template = ModelTemplate(model)
            self.resident = self.template.resident
            self._probe(model)
        else:  # a model directory: the resident base is loaded per variant
            self.resident = directory_base(ref, auto_class="AutoModelForCausalLM", dtype=DTYPES[settings.dtype],
                                           skip=self.modules_to_save, cache_root=cache_dir,
                                           prepare=self._prepare)
        if settings.packing:
            order = torch.randperm(len(self.train.examples),
                                   generator=torch.Generator().manual_seed(settings.seed)).tolist()
            self.blocks = pack([self.train.examples[i] for i in order], settings.max_length)

    def _prepare(self, model: torch.nn.Module) -> None:
        model.config.use_cache = False
        self._probe(model)

    def _probe(self, model: torch.nn.Module) -> None:
        """What only a forward pass tells, once: whether the loss may skip full logits, and
        whether the model keeps packed examples apart."""
        if self.lm_split is not None:
            return
        self.lm_split = split_reproduces_logits(model)  # chunked loss without full logits (tasks/lm_loss.py)
        if self.settings.packing:
            self.packing_isolated = packing_isolates(model)
            if not self.packing_isolated:
                self._warn(f"{type(model).__name__} does not separate packed examples by position_ids; "
                           "packed examples attend across their boundaries within a block")

    def _warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning("sft: %s", message)

    def _encode(self, table: Table) -> Split:
        split = encode_table(table, self.format, self.settings.columns, self.renderer, self.settings.max_length)
        if split.too_long:
            self._warn(f"{split.too_long} of {len(table.rows)} examples of {table.source!r} are longer than "
                       f"max_length = {self.settings.max_length} tokens and were left out")
        if split.content_only_turns:
            self._warn(f"{split.content_only_turns} assistant turns of {table.source!r} render differently once "
                       "later turns follow; only their content strings are supervised (no end-of-turn token)")
        if not split.examples:
            raise ConfigError("task.max_length", self.settings.max_length,
                              "a length that leaves at least one example",
                              f"all {len(table.rows)} examples of {table.source!r} are longer")
        return split

    def _generation(self, model: torch.nn.Module, scorer: Scorer) -> GenerationEval:
        generate = self.settings.generate
        examples = self.eval.examples[:generate.max_examples or None]
        stops = [self.tokenizer.eos_token_id, self.renderer.end_of_turn_id()]
        model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        stops += model_eos if isinstance(model_eos, list) else [model_eos]
        return GenerationEval(
            scorer=scorer, prompts=[e.prompt_ids for e in examples],
            references=[e.reference for e in examples], tokenizer=self.tokenizer, pad_id=self.pad_id,
            stop_ids=sorted({int(s) for s in stops if s is not None}), max_new_tokens=generate.max_new_tokens)

    # -- the protocol -----------------------------------------------------------------------

    def build_model(self) -> torch.nn.Module:
        if self.model_ref.startswith("config:"):
            return self.template.fresh()
        from lora_tune.tasks.base_loader import load_base

        model = load_base(self.model_ref, dtype=DTYPES[self.settings.dtype]).model
        self._prepare(model)
        return model

    def structure(self) -> torch.nn.Module:
        return self._structure

    def num_train_examples(self) -> int:
        """Rows of training batches: examples, or packed blocks with ``packing``."""
        return len(self.blocks) if self.blocks is not None else len(self.train.examples)

    def train_batches(self, batch_size: int, seed: int, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        rows: Sequence[Example | Block] = self.blocks if self.blocks is not None else self.train.examples
        positions = self.blocks is not None and self.packing_isolated
        for idx in index_batches(len(rows), batch_size, seed, epoch):
            yield collate([rows[i] for i in idx.tolist()], self.pad_id, positions)

    def batch_tokens(self, batch: Mapping[str, torch.Tensor]) -> int:
        """Non-padding input tokens of a batch."""
        return int(batch["attention_mask"].sum())

    def loss_weight(self, batch: Mapping[str, torch.Tensor]) -> int:
        """The units :meth:`loss` averages over: the supervised tokens of the batch (so gradient
        accumulation weighs micro-batches by tokens)."""
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def token_loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Summed cross-entropy over the supervised tokens of a batch, and their number."""
        inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "use_cache": False}
        if "position_ids" in batch:  # packed: the block-diagonal mask comes from the positions
            inputs["position_ids"] = batch["position_ids"]
        else:
            inputs["attention_mask"] = batch["attention_mask"]
        return next_token_loss(model, inputs, batch["labels"], split=bool(self.lm_split))

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total, count = self.token_loss(model, batch)
        return total / max(count, 1)

    def evaluate(self, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
        device = model_device(model)
        total, count = 0.0, 0
        with eval_mode(model):
            for start in range(0, len(self.eval_order), batch_size):
                rows = [self.eval.examples[i] for i in self.eval_order[start:start + batch_size]]
                summed, n = self.token_loss(model, self.to_device(collate(rows, self.pad_id, False), device))
                total += float(summed)
                count += n
        eval_loss = total / count
        if not math.isfinite(eval_loss):
            eval_loss = float("inf")
        metrics = {"eval_loss": eval_loss, "perplexity": perplexity(eval_loss)}
        if self.generation is not None:
            metrics[self.generation.scorer.name] = self.generation.score(model, batch_size)
        return metrics

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name, "model": self.model_ref, "weight_dtype": str(self.weight_dtype).replace("torch.", ""),
            "format": self.format, "train_on": self.train_on, "chat_template": self.renderer.template is not None,
            "max_length": self.settings.max_length, "train_examples": len(self.train.examples),
            "eval_examples": len(self.eval.examples), "dropped_too_long": {"train": self.train.too_long,
                                                                           "eval": self.eval.too_long},
        }
        if self.blocks is not None:
            info["packed_blocks"] = len(self.blocks)
            info["packing_isolated"] = self.packing_isolated
        if self.generation is not None:
            info["generate"] = {"metric": self.generation.scorer.name, "prompts": len(self.generation.prompts)}
        if self.warnings:
            info["warnings"] = list(self.warnings)
        return info


def build(spec: dict) -> SFTTask:
    return SFTTask(spec)
