"""Generation metrics of the ``sft`` task (``task.generate``: ``max_new_tokens``, ``metric``,
``max_examples``): each evaluation prompt decoded greedily until a stop token (EOS, the model's
generation EOS ids, the template's end-of-turn token), and the mean of
``metric(prediction, reference)`` over the stripped texts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch

from lora_tune.errors import ConfigError
from lora_tune.tasks.base import Field, Problems, check_spec, eval_mode, is_int, is_str, model_device

Score = Callable[[str, str], float]


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction == reference)


def contains(prediction: str, reference: str) -> float:
    return float(reference in prediction)


BUILTIN_METRICS: dict[str, Score] = {"exact_match": exact_match, "contains": contains}


@dataclass(frozen=True)
class GenerateSettings:
    """``task.generate``; the defaults are the documented ones."""

    max_new_tokens: int = 32
    metric: str = "exact_match"
    max_examples: int | None = None

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> GenerateSettings:
        return cls(**{k: v for k, v in spec.items() if v is not None})


def _check_metric(value: Any) -> str | None:
    not_text = is_str(value)
    if not_text or value in BUILTIN_METRICS:
        return not_text
    target, _, func = value.rpartition(":")
    if not target or not func.isidentifier():
        return (f"must be one of {', '.join(BUILTIN_METRICS)}, or 'package.module:function' / "
                f"'path/to/file.py:function'; got {value!r}")
    return None


FIELDS = {
    "max_new_tokens": Field(is_int(1)),
    "metric": Field(_check_metric),
    "max_examples": Field(is_int(1)),
}


def validate_generate(spec: Any) -> Problems:
    return check_spec(spec, FIELDS, prefix="task.generate")


@dataclass(frozen=True)
class Scorer:
    name: str
    score: Score


def resolve_scorer(ref: str) -> Scorer:
    """The metric ``ref`` names; ConfigError naming ``task.generate.metric`` when it cannot be loaded."""
    if ref in BUILTIN_METRICS:
        return Scorer(ref, BUILTIN_METRICS[ref])
    from lora_tune.tasks.python_factory import load_factory

    try:
        fn = load_factory(ref)
    except ConfigError as exc:
        raise ConfigError("task.generate.metric", ref, exc.allowed,
                          str(exc.__cause__) if exc.__cause__ else None) from exc
    return Scorer(getattr(fn, "__name__", ref.rpartition(":")[2]), fn)


def greedy_generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_id: int,
                    stop_ids: Sequence[int], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """The greedy continuation of each prompt (up to and without the first stop token), in
    batches longest first, padded on the left."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
                              eos_token_id=list(stop_ids) or None, pad_token_id=pad_id)
    device = model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            width = max(len(prompts[i]) for i in rows)
            input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
            for row, i in enumerate(rows):
                input_ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                attention_mask[row, width - len(prompts[i]):] = 1
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                 generation_config=config)
            for row, i in enumerate(rows):
                new = out[row, width:].tolist()
                cut = next((k for k, token in enumerate(new) if token in stops), len(new))
                outputs[i] = new[:cut]
    return outputs


@dataclass
class GenerationEval:
    """Scores greedy answers to ``prompts`` against ``references``."""

    scorer: Scorer
    prompts: list[list[int]]
    references: list[str]
    tokenizer: Any
    pad_id: int
    stop_ids: list[int]
    max_new_tokens: int

    def predictions(self, model: torch.nn.Module, batch_size: int) -> list[str]:
        ids = greedy_generate(model, self.prompts, pad_id=self.pad_id, stop_ids=self.stop_ids,
                              max_new_tokens=self.max_new_tokens, batch_size=batch_size)
        return [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]

    def score(self, model: torch.nn.Module, batch_size: int) -> float:
        predictions = self.predictions(model, batch_size)
        scores = [float(self.scorer.score(p, r.strip())) for p, r in zip(predictions, self.references)]
        return sum(scores) / len(scores)
