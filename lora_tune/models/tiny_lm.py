"""Small Hugging Face decoder LMs built from configs (the ``sft`` task's ``model: {config: ...}``),
and a chat tokenizer for them: decoder models and chat tokenizers without downloading anything.
transformers is imported inside the functions (an optional dependency)."""
from __future__ import annotations

from pathlib import Path
from typing import Any
from collections.abc import Iterable, Mapping

import torch

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|end|>"
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
SPECIAL_TOKENS = (PAD, BOS, EOS) + ROLE_MARKERS

# ChatML-like: <|bos|><|user|>\n...<|end|><|assistant|>\n...<|end|>; the end-of-turn marker is EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_SHARED = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 512}
TINY_SIZES: dict[str, dict[str, Any]] = {
    "llama": dict(_SHARED),
    "qwen2": dict(_SHARED),
    "mistral": dict(_SHARED),
    "phi3": dict(_SHARED),
    "gemma2": dict(_SHARED, head_dim=16, query_pre_attn_scalar=16),
    "gpt2": {"n_embd": 64, "n_inner": 128, "n_layer": 2, "n_head": 4, "n_positions": 512},
    "opt": {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "word_embed_proj_dim": 64, "max_position_embeddings": 512},
}


def tiny_config(model_type: str, **overrides: Any) -> dict[str, Any]:
    """Config keys (with ``model_type``) of a tiny model of a family in :data:`TINY_SIZES`."""
    if model_type not in TINY_SIZES:
        raise ValueError(f"no tiny sizes for model_type {model_type!r}; known: {', '.join(TINY_SIZES)}")
    return {"model_type": model_type, **TINY_SIZES[model_type], **overrides}


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """``pad_token_id`` / ``bos_token_id`` / ``eos_token_id`` a model config should take from a
    tokenizer (pad falls back to EOS); ids the tokenizer lacks are left out."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id}
    return {key: int(value) for key, value in ids.items() if value is not None}


def config_problems(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, message)`` for each problem of config keys for :func:`causal_lm_from_config`
    (transformers' configs keep unknown keys silently, so a typo would go unnoticed)."""
    import inspect

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        known = sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING)
        message = (f"must be a transformers model type with a causal-LM class (e.g. {', '.join(TINY_SIZES)}; "
                   f"{len(known)} known), got {model_type!r}")
        return [("model_type", message)]
    config_class = CONFIG_MAPPING[model_type]
    allowed = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
    allowed |= set(getattr(config_class, "attribute_map", {}))
    return [(key, f"unknown key for model_type {model_type!r}; allowed: {', '.join(sorted(allowed))}")
            for key in config if key != "model_type" and key not in allowed]


def causal_lm_from_config(config: Mapping[str, Any], seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ``AutoModelForCausalLM`` from config keys (one ``model_type``),
    depending only on ``seed``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keys = dict(config)
    model_type = keys.pop("model_type")
    hf_config = AutoConfig.for_model(model_type, **keys)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(hf_config)


def save_tiny_model(model_type: str, path: str | Path, tokenizer: Any = None, seed: int = 0,
                    **config: Any) -> Path:
    """Save a tiny seeded random ``model_type`` model (and ``tokenizer``, whose vocabulary and
    special ids it takes) to ``path``; ``config`` overrides any :data:`TINY_SIZES` key."""
    path = Path(path)
    if tokenizer is not None:
        config = {"vocab_size": len(tokenizer), **special_token_ids(tokenizer), **config}
    model = causal_lm_from_config(tiny_config(model_type, **config), seed=seed)
    model.save_pretrained(str(path))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


def build_chat_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 512) -> Any:
    """Train a byte-level BPE tokenizer on ``texts`` (digits one per token, :data:`SPECIAL_TOKENS`
    special) and save it to ``path`` with :data:`CHAT_TEMPLATE`; returns it loaded back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                        additional_special_tokens=list(ROLE_MARKERS))
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
