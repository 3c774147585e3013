"""Tiny models of every family the presets are checked on, built from configs (seeded, no downloads).

Decoder LMs come from :func:`tests.lora.hf_models.tiny_causal_lm`; this adds the encoders,
encoder-decoders, the vision and speech models, and the two mixture-of-experts families. Each
builder returns ``(model, inputs)``: the keyword arguments of one forward call.
"""
from __future__ import annotations

import torch

from .hf_models import HIDDEN, LAYERS, VOCAB, tiny_causal_lm, tokens

HEADS = 4
MOE = dict(num_hidden_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=2,
           max_position_embeddings=32, vocab_size=VOCAB)
EXPERTS = 4


def _seeded(build, seed: int = 0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build().eval()


def _gen(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixtral(seed: int = 0, **overrides):
    return tiny_causal_lm("mixtral", seed, **{**MOE, "intermediate_size": 48, "num_local_experts": EXPERTS,
                                              "num_experts_per_tok": 2, "router_jitter_noise": 0.0, **overrides})


def qwen2_moe(seed: int = 0, **overrides):
    return tiny_causal_lm("qwen2_moe", seed, **{**MOE, "intermediate_size": 64, "moe_intermediate_size": 24,
                                                "shared_expert_intermediate_size": 40, "num_experts": EXPERTS,
                                                "num_experts_per_tok": 2, **overrides})


def bert(seed: int = 0, layers: int = LAYERS):
    import transformers as T

    config = T.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=layers, num_attention_heads=HEADS,
                          intermediate_size=64, max_position_embeddings=32, num_labels=3,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _seeded(lambda: T.BertForSequenceClassification(config), seed), {"input_ids": tokens()}


def roberta(seed: int = 0):
    import transformers as T

    config = T.RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                             intermediate_size=64, max_position_embeddings=40, num_labels=3, pad_token_id=0,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _seeded(lambda: T.RobertaForSequenceClassification(config), seed), {"input_ids": tokens()}


def t5(seed: int = 0, decoder_layers: int = LAYERS):
    import transformers as T

    config = T.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=LAYERS,
                        num_decoder_layers=decoder_layers, num_heads=HEADS, dropout_rate=0.0,
                        decoder_start_token_id=0, pad_token_id=0)
    ids = tokens()
    return _seeded(lambda: T.T5ForConditionalGeneration(config), seed), {"input_ids": ids, "decoder_input_ids": ids}


def bart(seed: int = 0):
    import transformers as T

    config = T.BartConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                          encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                          decoder_ffn_dim=64, max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    ids = tokens()
    return _seeded(lambda: T.BartForConditionalGeneration(config), seed), {"input_ids": ids, "decoder_input_ids": ids}


def vit(seed: int = 0):
    import transformers as T

    config = T.ViTConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=64,
                         image_size=16, patch_size=8, num_labels=3, hidden_dropout_prob=0.0,
                         attention_probs_dropout_prob=0.0)
    pixels = torch.randn(2, 3, 16, 16, generator=_gen())
    return _seeded(lambda: T.ViTForImageClassification(config), seed), {"pixel_values": pixels}


def whisper(seed: int = 0):
    import transformers as T

    config = T.WhisperConfig(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                             encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=64,
                             decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
                             decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0)
    features = torch.randn(2, 8, 32, generator=_gen())
    return _seeded(lambda: T.WhisperForConditionalGeneration(config), seed), {
        "input_features": features, "decoder_input_ids": tokens(length=6)}


def build(family: str, seed: int = 0):
    """``(model, forward kwargs)`` of a tiny model of ``family``."""
    if family in ("bert", "roberta", "t5", "bart", "vit", "whisper"):
        return globals()[family](seed)
    model = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}.get(family, lambda s: tiny_causal_lm(family, s))(seed)
    return model, {"input_ids": tokens()}
