"""Next-token cross-entropy of a decoder LM without full-vocabulary logits (for Qwen2's 151,936
tokens at 4 x 1,024 those are ~2.5 GB in float32, and as much again for their gradient).

:func:`next_token_loss` runs the model's body (``get_decoder()``, the module its forward calls,
so checkpointing, LoRA and masks work as before), keeps the supervised positions' hidden states,
and applies the head (:class:`LMHead`: the output module called as a module, so a LoRA wrapper,
a ``modules_to_save`` or a tied head works, then the model's logit scaling and soft-capping)
with the float32 cross-entropy in checkpointed chunks of rows: one chunk's logits exist at a
time, forward and backward. The sum equals :func:`full_logits_loss`'s up to float32 rounding.

Whether body + head reproduce ``model(...).logits`` is checked once per task
(:func:`split_reproduces_logits`; Falcon-H1's ``lm_head_multiplier`` fails it: full logits
then). On CUDA with liger-kernel and a plain ``nn.Linear`` head (Liger reads the weight
directly, past any adapter) its fused loss is used instead. ``LORA_TUNE_LM_LOSS`` = ``auto``,
``chunked`` or ``full`` overrides the choice.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lora_tune.errors import ConfigError
from lora_tune.tasks.base import eval_mode, model_device

IGNORE = -100
ENV = "LORA_TUNE_LM_LOSS"
BACKENDS = ("auto", "chunked", "full")
CHUNK_BYTES = 256 * 2**20  # float32 logits of one chunk
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 128, 4096

__all__ = ["IGNORE", "LMHead", "choose_backend", "chunk_rows", "chunked_loss", "full_logits_loss", "lm_head_of",
           "next_token_loss", "requested_backend", "split_reproduces_logits"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LMHead:
    """A causal LM split in two: ``body`` (inputs -> final hidden states) and the head
    (:meth:`logits`: ``module``, then the model's logit scaling and soft-capping)."""

    body: torch.nn.Module
    module: torch.nn.Module
    vocab: int
    multiplier: float | None = None  # Cohere: logits * logit_scale
    divisor: float | None = None  # Granite: logits / logits_scaling
    softcap: float | None = None  # Gemma 2/3: tanh(logits / cap) * cap

    def hidden(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        out = self.body(**inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits of ``hidden`` (in the model's dtype), as its forward computes them."""
        logits = self.module(hidden)
        if self.multiplier is not None:
            logits = logits * self.multiplier
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def lm_head_of(model: torch.nn.Module) -> LMHead | None:
    """The body and head of a Hugging Face causal LM as they are now (the head may be a LoRA
    wrapper), or None where the model has no separate body or output module."""
    get_decoder = getattr(model, "get_decoder", None)
    get_output = getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_output is None:
        return None
    try:
        body, module = get_decoder(), get_output()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if not isinstance(body, torch.nn.Module) or body is model or not isinstance(module, torch.nn.Module):
        return None
    config = getattr(model, "config", None)
    softcap = _number(getattr(config, "final_logit_softcapping", None))
    vocab = _number(getattr(config, "vocab_size", None)) or _number(getattr(module, "out_features", None)) or 0
    return LMHead(body=body, module=module, vocab=int(vocab), multiplier=_number(getattr(config, "logit_scale", None)),
                  divisor=_number(getattr(config, "logits_scaling", None)), softcap=softcap or None)


def split_reproduces_logits(model: torch.nn.Module, tokens: int = 8) -> bool:
    """Whether :func:`lm_head_of` applied to ``model`` gives ``model(input_ids).logits`` on a few tokens."""
    head = lm_head_of(model)
    if head is None:
        log.info("%s has no separate body and output layer: its loss uses full logits", type(model).__name__)
        return False
    try:
        ids = (torch.arange(tokens) % max(head.vocab, 1))[None].to(model_device(model))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
        with eval_mode(model):
            full = model(**inputs).logits.float()
            split = head.logits(head.hidden(inputs)).float()
    except Exception as exc:  # any failure means: do not split this model
        log.info("%s cannot be split into body and head (%s): its loss uses full logits", type(model).__name__, exc)
        return False
    dtype = next(model.parameters()).dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    same = full.shape == split.shape and bool(
        (full - split).abs().max() <= tolerance * max(1.0, float(full.abs().max())))
    if not same:
        log.info("body and head of %s do not reproduce its logits: its loss uses full logits", type(model).__name__)
    return same


def chunk_rows(vocab: int) -> int:
    """Rows per chunk: about :data:`CHUNK_BYTES` of float32 logits (Qwen2's 151,936 tokens: 441
    rows; Llama 3's 128,256: 523; 32,000: 2,097), between 128 and 4,096."""
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * max(vocab, 1))))


def _chunk_sum(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head.logits(hidden).float(), targets, reduction="sum")


def chunked_loss(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Summed float32 cross-entropy of ``head.logits(hidden)`` ([n, hidden]) against ``targets``
    ([n], no ignored ones), ``rows`` at a time; with gradients each chunk is checkpointed, so its
    logits are freed after its forward and recomputed alone in the backward."""
    if rows is None:
        rows = chunk_rows(head.vocab)
    grad = torch.is_grad_enabled()
    total: torch.Tensor | None = None
    for start in range(0, max(len(hidden), 1), rows):  # zero rows: one empty chunk (a 0 connected to the graph)
        h, t = hidden[start:start + rows], targets[start:start + rows]
        part = checkpoint(_chunk_sum, head, h, t, use_reentrant=False) if grad else _chunk_sum(head, h, t)
        total = part if total is None else total + part
    assert total is not None
    return total


def full_logits_loss(model: torch.nn.Module, inputs: Mapping[str, Any],
                     labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The full-logits fallback: the summed float32 cross-entropy over ``labels[:, 1:] != -100``
    and their number."""
    logits = model(**inputs).logits
    targets = labels[:, 1:]
    mask = targets != IGNORE
    picked = logits[:, :-1][mask].float()
    return F.cross_entropy(picked, targets[mask], reduction="sum"), int(mask.sum())


def requested_backend() -> str:
    """``LORA_TUNE_LM_LOSS`` (``auto`` when unset)."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ConfigError(ENV, value, ", ".join(BACKENDS))
    return value


@functools.cache  # an import-system probe: once per process, not once per training step
def _liger_installed() -> bool:
    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):
        return False


def choose_backend(head: LMHead | None, device: torch.device | str, requested: str = "auto") -> str:
    """``full``, ``liger`` or ``chunked`` for a loss on ``device``."""
    if requested == "full" or head is None:
        return "full"
    if (requested == "auto" and torch.device(device).type == "cuda" and torch.is_grad_enabled()
            and type(head.module) is torch.nn.Linear and head.multiplier is None and head.divisor is None
            and _liger_installed()):
        return "liger"
    return "chunked"


@functools.cache  # a failed import is retried (and warned about) once per process, not once per step
def _liger_loss_class() -> Any:
    """Liger's ``LigerFusedLinearCrossEntropyLoss``, or None where liger-kernel cannot be imported."""
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:  # installed but broken (e.g. no triton): the own implementation
        log.warning("liger-kernel cannot be imported (%s); using the chunked cross-entropy", exc)
        return None
    return LigerFusedLinearCrossEntropyLoss


def _liger_loss(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Liger's fused linear cross-entropy (summed), or None where it cannot be used."""
    if hidden.dtype != head.module.weight.dtype:
        return None
    fused = _liger_loss_class()
    if fused is None:
        return None
    kwargs: dict[str, Any] = {"ignore_index": IGNORE, "reduction": "sum"}
    if head.softcap is not None:
        kwargs["softcap"] = head.softcap
    loss = fused(**kwargs)(head.module.weight, hidden, targets, head.module.bias)
    return (loss[0] if isinstance(loss, tuple) else loss).float()


def next_token_loss(model: torch.nn.Module, inputs: Mapping[str, Any], labels: torch.Tensor, *,
                    split: bool = True, rows: int | None = None) -> tuple[torch.Tensor, int]:
    """What :func:`full_logits_loss` gives, without full-vocabulary logits. ``inputs``: the model's
    keyword arguments; ``split``: whether :func:`split_reproduces_logits` holds for the model."""
    head = lm_head_of(model) if split else None
    backend = choose_backend(head, labels.device, requested_backend())
    if backend == "full" or head is None:
        return full_logits_loss(model, inputs, labels)
    hidden = head.hidden(inputs)
    targets = labels[:, 1:].to(hidden.device)
    mask = targets != IGNORE
    picked, wanted = hidden[:, :-1][mask], targets[mask]
    if backend == "liger":
        loss = _liger_loss(head, picked, wanted)
        if loss is not None:
            return loss, len(wanted)
    return chunked_loss(head, picked, wanted, rows), len(wanted)
