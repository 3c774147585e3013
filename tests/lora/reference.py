"""An independent autograd reference for LoRA: W = W0 + s * B @ A built explicitly from the
factors (in float64), then the ORIGINAL torch module is called with that weight through
``torch.func.functional_call``. Nothing here uses lora_tune's wrapper code."""
from __future__ import annotations

import copy

import torch
from torch.func import functional_call


def delta_for(kind: str, A: torch.Tensor, B: torch.Tensor, shape, parts=None, sizes=None) -> torch.Tensor:
    """The weight delta B @ A laid out like the base weight (unscaled). A fused layer's output
    rows are q, k, v blocks of ``sizes`` rows (default: equal thirds)."""
    if kind in ("linear",):
        return B @ A
    if kind == "gpt2":
        return (B @ A).t()
    if kind == "embedding":
        return (B @ A).t()
    if kind == "conv":
        return (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(shape)
    if kind in ("fused", "fused_t", "proj"):
        # parts: booleans for q, k, v; each enabled part has its own rank-r pair
        out = shape[1] if kind == "fused_t" else shape[0]
        sizes = sizes or [out // len(parts)] * len(parts)
        r = A.shape[0] // sum(parts)
        rows, k, row = [], 0, 0
        for on, size in zip(parts, sizes):
            if on:
                rows.append(B[row:row + size] @ A[k * r:(k + 1) * r])
                k += 1
                row += size
            else:
                rows.append(torch.zeros(size, A.shape[1], dtype=A.dtype))
        full = torch.cat(rows, 0)
        return full.t() if kind == "fused_t" else full
    raise ValueError(kind)


def reference_call(module: torch.nn.Module, weights: dict[str, torch.Tensor], args, kwargs=None):
    """Call a float64 deep copy of ``module`` with some of its parameters replaced."""
    ref = copy.deepcopy(module).double()
    params = {k: v.double() if v.is_floating_point() else v for k, v in weights.items()}
    return functional_call(ref, params, args, kwargs or {})


def dora_weight(kind: str, w: torch.Tensor, m: torch.Tensor, parts=None, sizes=None) -> torch.Tensor:
    """DoRA from the paper: ``m * W / ||W||`` per output feature of the adapted weight ``W`` (laid out
    like the base weight), the norm detached. The output features are the rows of a Linear or Conv
    weight, the columns of a GPT-2 Conv1D weight (in x out), and -- PEFT's convention -- the columns
    (embedding dimensions) of an Embedding table. In a fused layer only the adapted parts' rows
    have a magnitude (``m`` covers them in order); the other rows are left as they are."""
    transposed = kind in ("gpt2", "fused_t", "embedding")
    rows = w.t() if transposed else w.reshape(w.shape[0], -1)
    norm = rows.norm(dim=1).detach()
    if parts is not None and kind in ("fused", "fused_t"):
        sizes = sizes or [rows.shape[0] // len(parts)] * len(parts)
        scale, start, used = [], 0, 0
        for on, size in zip(parts, sizes):
            if on:
                scale.append(m[used:used + size] / norm[start:start + size])
                used += size
            else:
                scale.append(torch.ones(size, dtype=rows.dtype))
            start += size
        scale = torch.cat(scale)
    else:
        scale = m / norm
    out = rows * scale[:, None]
    return out.t() if transposed else out.reshape(w.shape)


def merge_round_trip(model, x):
    """``(y, y_merged, y_again)``: the model's output as adapted, after ``lora_tune.merge`` and
    after ``lora_tune.unmerge`` (no gradients); callers assert with their own tolerances."""
    import torch

    import lora_tune

    with torch.no_grad():
        y = model(x)
        lora_tune.merge(model)
        y_merged = model(x)
        lora_tune.unmerge(model)
        y_again = model(x)
    return y, y_merged, y_again


def changed_by_training(model, make_x, *, steps: int = 3, all_params: bool = False, **adamw) -> dict[str, bool]:
    """Whether each parameter of ``model`` changed over ``steps`` AdamW steps on a squared-output
    loss. ``all_params``: hand the optimizer every parameter, frozen ones too (they get no gradient,
    so even weight decay must leave them); otherwise only the trainable ones."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = model.parameters() if all_params else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **{"lr": 1e-2, **adamw})
    for _ in range(steps):
        opt.zero_grad()
        model(make_x()).float().pow(2).mean().backward()
        opt.step()
    return {n: not torch.equal(p, before[n]) for n, p in model.named_parameters()}


def randomize_lora_b(model, std: float = 0.3) -> None:
    """Give every ``lora_B`` random values (freshly injected they are zero: the adapter would be a no-op)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=std)
