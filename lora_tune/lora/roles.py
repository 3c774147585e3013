"""What an adaptable layer does in its model (its role), read from where it sits in the module tree.

The presets are built from these roles, so they mean the same thing in every family:

* **attention** (``q``, ``k``, ``v``, ``o``, fused ``qkv``): every layer whose nearest enclosing
  module that says what it is (by its attribute name or its type name) is an attention module --
  ``self_attn``, ``SelfAttention``, ``encoder_attn`` / ``EncDecAttention`` / ``crossattention``
  (cross-attention is attention), ``attention``. Inside it, q / k / v are told apart by name,
  and every other projection (``o_proj``, ``out_proj``, BERT's ``attention.output.dense``) is
  the output projection ``o``.
* **mlp**: the nearest such module is a feed-forward one (``mlp``, ``ffn``, T5's ``LayerFF``,
  ``intermediate``, ``experts``, a mixture-of-experts block), or the layer sits in a repeated
  block outside its attention (OPT's ``fc1``, BERT's ``output.dense``). So T5's
  ``DenseReluDense.wi`` / ``wo`` are MLP: ``wo`` is not an attention output there.
* **expert**: a 3-D expert weight stack (``experts.gate_up_proj``): MLP too.
* **router**: the gate of a mixture-of-experts block (a ``gate`` / ``router`` layer beside the
  experts, Qwen2-MoE's ``shared_expert_gate``): never in a preset, the router stays frozen.
* **head**: an output layer outside the blocks -- named as one (``lm_head``, ``classifier``,
  ``score``, ...), inside one (RoBERTa's ``classifier.out_proj``), whose weight is tied to an
  embedding, or whose output size is the vocabulary (Whisper's ``proj_out``).
* **other**: any other layer outside the blocks (BERT's pooler, OPT's ``project_in``), and the
  layers of a non-attention sequence mixer (``mixer``, ``mamba``, ``ssm`` modules of hybrid
  models): neither attention nor MLP; in ``all-linear`` only.

Names are the fallback only where the tree says nothing (a model without blocks or
attention/MLP modules): ``q_proj``-like names are attention, ``fc1`` / ``linear1``-like names MLP.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from lora_tune.lora.blocks import LayerStack, locate
from lora_tune.lora.quant import QuantizedLinear

ATTENTION_ROLES = ("q", "k", "v", "o", "qkv", "qkv_whole")
ROLE_GROUPS = {"q": "attention", "k": "attention", "v": "attention", "o": "attention", "qkv": "attention",
               "qkv_whole": "attention", "mlp": "mlp", "expert": "mlp", "router": "router", "head": "head",
               "other": "other"}
"""Role -> the group reports count it in (attention, mlp, router, head, other)."""

Q_NAMES = {"q", "query", "q_proj", "q_lin", "wq", "to_q", "queries", "q_attn"}
K_NAMES = {"k", "key", "k_proj", "k_lin", "wk", "to_k", "keys"}
V_NAMES = {"v", "value", "v_proj", "v_lin", "wv", "to_v", "values"}
O_NAMES = {"o", "o_proj", "out_proj", "out_lin", "wo", "to_out", "attn_out", "dense", "c_proj", "proj", "out",
           "output"}
HEAD_NAMES = {"lm_head", "classifier", "pre_classifier", "score", "head", "heads", "out_head", "qa_outputs",
              "output_layer", "proj_out", "classification_head", "cls", "predictions", "lm_heads"}
MLP_NAMES = {"fc1", "fc2", "c_fc", "linear1", "linear2", "up_proj", "down_proj", "gate_proj", "gate_up_proj",
             "lin1", "lin2", "w1", "w2", "w3", "dense_h_to_4h", "dense_4h_to_h", "wi", "wi_0", "wi_1", "fc_in",
             "fc_out_ffn"}
_ATTENTION_WORDS = ("attention", "attn")
_MLP_WORDS = ("mlp", "feedforward", "feed_forward", "intermediate", "expert", "moe", "ffn")
_MLP_TOKENS = {"ff", "fc"}
_OTHER_WORDS = ("mixer", "mamba", "ssm", "recurrent", "rnn")  # sequence mixers of hybrid models
_ROUTER_TOKENS = {"gate", "router", "gating"}
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def _tokens(text: str) -> set[str]:
    return {t.lower() for part in re.split(r"[^A-Za-z0-9]+", text) for t in _CAMEL.findall(part)}


def _scope_of(text: str) -> str | None:
    """'attention', 'mlp', 'other' (a non-attention sequence mixer) or None for an attribute or type name."""
    low = text.lower()
    if any(w in low for w in _ATTENTION_WORDS) or "mha" in _tokens(text):
        return "attention"
    if any(w in low for w in _MLP_WORDS) or _tokens(text) & _MLP_TOKENS:
        return "mlp"
    if any(w in low for w in _OTHER_WORDS):
        return "other"
    return None


def _ancestors(name: str) -> list[str]:
    """Names of the modules enclosing ``name``, innermost first, without the model itself."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def enclosing_scope(modules: dict[str, nn.Module], name: str, stacks: Sequence[LayerStack]) -> str | None:
    """The scope ('attention' / 'mlp') of the nearest enclosing module that states one, looking no
    further out than the layer's block."""
    where = locate(name, stacks)
    block = where[0].block(where[1]) if where else None
    for ancestor in _ancestors(name):
        if block is not None and (ancestor == block or not ancestor.startswith(block + ".")):
            break
        scope = _scope_of(ancestor.rsplit(".", 1)[-1]) or _scope_of(type(modules[ancestor]).__name__)
        if scope:
            return scope
    return None


def _is_router(modules: dict[str, nn.Module], name: str, has_experts) -> bool:
    parent = name.rpartition(".")[0]
    holder = modules.get(parent)
    if holder is None or not _tokens(name.rsplit(".", 1)[-1]) & _ROUTER_TOKENS:
        return False
    return any(has_experts(child) or child_name == "experts" for child_name, child in holder.named_children())


def _is_head(model: nn.Module, modules: dict[str, nn.Module], name: str, module: nn.Module) -> bool:
    last = name.rsplit(".", 1)[-1].lower()
    if last in HEAD_NAMES or any(a.rsplit(".", 1)[-1].lower() in HEAD_NAMES for a in _ancestors(name)):
        return True
    weight = getattr(module, "weight", None)
    if weight is not None and any(isinstance(m, nn.Embedding) and m.weight is weight for m in modules.values()):
        return True
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    out = weight.shape[0] if isinstance(module, nn.Linear) and weight is not None else None
    if isinstance(module, QuantizedLinear):
        out = module.out_features
    return isinstance(vocab, int) and out == vocab


def _named_attention(modules: dict[str, nn.Module], name: str, fused_name: bool) -> bool:
    """Where the tree says nothing: q/k/v-like names, a fused qkv name, or an output projection
    beside q/k/v-like siblings (a bare ``in_proj`` / ``out_proj`` is also what Mamba mixers have)."""
    parent, _, last = name.rpartition(".")
    last = last.lower()
    if last in Q_NAMES | K_NAMES | V_NAMES or (fused_name and last != "in_proj"):
        return True
    holder = modules.get(parent)
    siblings = {n.lower() for n, _ in holder.named_children()} if holder is not None else set()
    return last in {"o_proj", "out_proj", "attn_out", "wo", "o"} and bool(siblings & (Q_NAMES | K_NAMES | V_NAMES))


def layer_role(model: nn.Module, modules: dict[str, nn.Module], name: str, module: nn.Module, *,
               fused: bool, fused_name: bool, stacks: Sequence[LayerStack], has_experts) -> str:
    """The role of the Linear-like layer ``name``: q, k, v, o, qkv (a fused projection whose split
    is known), qkv_whole (fused, split unknown), mlp, router, head or other. ``has_experts(module)``
    says whether a module holds expert stacks."""
    last = name.rsplit(".", 1)[-1].lower()
    in_block = locate(name, stacks) is not None
    scope = enclosing_scope(modules, name, stacks)
    if scope is None and not in_block and _is_head(model, modules, name, module):
        return "head"
    if _is_router(modules, name, has_experts):
        return "router"
    if scope == "other":
        return "other"
    if scope == "attention" or (scope is None and _named_attention(modules, name, fused_name)):
        if fused:
            return "qkv"
        if fused_name:
            return "qkv_whole"
        for role, names in (("q", Q_NAMES), ("k", K_NAMES), ("v", V_NAMES)):
            if last in names:
                return role
        return "o"
    if scope == "mlp" or in_block or last in MLP_NAMES:
        return "mlp"
    return "other"
