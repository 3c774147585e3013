"""Tiny transformers causal LMs built from configs (random, seeded weights; no downloads)."""
from __future__ import annotations

import torch

VOCAB = 64
LAYERS = 2
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8   # grouped-query where the family has it: q 32 rows, k and v 16 each
HIDDEN = HEADS * HEAD_DIM

_COMMON = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, attention_dropout=0.0, max_position_embeddings=32)
FAMILY_CONFIGS = {
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "gemma2": {**_DECODER, "head_dim": HEAD_DIM},
    "phi3": {**_DECODER, "resid_pdrop": 0.0, "embd_pdrop": 0.0},
    "gpt2": dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                word_embed_proj_dim=HIDDEN, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0),
}


def tiny_causal_lm(model_type: str, seed: int = 0, **overrides):
    """``AutoModelForCausalLM.from_config`` of a small ``model_type`` config, in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**_COMMON, **FAMILY_CONFIGS.get(model_type, {}), **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def tokens(batch: int = 2, length: int = 8, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
