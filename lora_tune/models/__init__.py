"""Small reference transformers used by the built-in tasks and the tests.

``TinyViT`` (the digits quickstart model; ``q_proj/k_proj/v_proj/out_proj`` attention and
``fc1/fc2`` MLP) and ``MiniGPT`` (a minGPT-style decoder with a fused ``c_attn``).
"""
from lora_tune.models.gpt import GPTConfig, MiniGPT
from lora_tune.models.vit import TinyViT, ViTConfig

__all__ = ["GPTConfig", "MiniGPT", "TinyViT", "ViTConfig"]
