"""The undo record of ``inject``: what it changed in a model, so that ``detach`` gives the base back
exactly as it was (issue 18: one resident base per worker, fresh adapters per trial).

``inject`` changes a model in place, and only through an :class:`Attachment`: it swaps a wrapper in
for each target module (under each of its names), replaces base parameters (PiSSA's residual is a
new Parameter; a base quantized at inject loses its dense one), sets ``requires_grad``, makes base
parameters trainable (biases for ``bias="all"`` / ``"lora_only"``, ``modules_to_save``: their values
are snapshotted, as they change in training), turns torch's nested-tensor fast path off and
records its config. The record also keeps what a trial's training changes in the frozen base
without inject's doing: every module's ``training`` flag, and the values of the persistent
buffers (BatchNorm's running statistics move in every training step, frozen or not). It is kept
on the model as ``model._lora_tune_attached`` (:data:`ATTACHED`); a second ``inject`` on the
same model stacks a new record over the first (``previous``).

:meth:`Attachment.undo` reverts one record: snapshotted values copied back in place (with the
gradients those parameters had), parameter objects and modules put back, flags and attributes
restored. The base's own tensors are never written by ``inject`` (merging writes them, with a
bit-exact backup that ``detach`` restores by unmerging first), so afterwards ``state_dict()`` is
bit for bit what it was, with the same Parameter objects.

While attached, keep the model on its device and in its dtype: a parameter inject took out of
the model (the dense weight of a layer quantized at inject, the original under PiSSA's residual)
is not moved or cast with it, and ``detach`` puts it back as it was.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

ATTACHED = "_lora_tune_attached"
"""The model attribute holding the latest :class:`Attachment` (absent: nothing attached)."""

CONFIG_ATTR = "_lora_tune_config"
"""The model attribute where ``inject`` records its LoraConfig (read by ``save_adapter``)."""


@dataclass(eq=False)
class Attachment:
    """Everything one ``inject`` changed in a model, to be undone by :meth:`undo`."""

    previous: Attachment | None = None
    """The record of an earlier inject on the same model (stacked adapters), undone after this one."""
    modules: list[tuple[nn.Module, str, nn.Module | None]] = field(default_factory=list)
    """(parent, child name, the original module) of every module swapped out, in order."""
    params: list[tuple[nn.Module, str, nn.Parameter | None]] = field(default_factory=list)
    """(owner, name, the Parameter it held) of every base parameter replaced or dropped, in order."""
    flags: dict[int, tuple[nn.Parameter, bool, torch.Tensor | None]] = field(default_factory=dict)
    """id -> (parameter, its requires_grad, a copy of its grad) before its flag was first set."""
    values: dict[int, tuple[nn.Module, str, str, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """id -> (owner, ``_parameters`` or ``_buffers``, name, the tensor, a copy of its value) of base
    tensors that train (or update) while attached."""
    attrs: list[tuple[object, str, bool, object]] = field(default_factory=list)
    """(object, attribute, whether its ``__dict__`` had it, its value) of plain attributes set."""
    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    """Every module of the model and its ``training`` flag at inject."""

    @classmethod
    def begin(cls, model: nn.Module) -> Attachment:
        """A record for a new inject into ``model`` (stacked over the one already attached, if any)."""
        return cls(previous=attached(model), training=[(m, m.training) for m in model.modules()])

    # -- the changes inject makes, each recorded before it is made ------------------------------------
    def swap(self, parent: nn.Module, child: str, module: nn.Module) -> None:
        """Register ``module`` as ``parent.<child>`` in place of the module there."""
        self.modules.append((parent, child, parent._modules[child]))
        setattr(parent, child, module)

    def replace_param(self, owner: nn.Module, name: str, new: nn.Parameter | None) -> None:
        """Make ``new`` the parameter ``name`` of ``owner`` (None: drop it, e.g. for a quantized copy)."""
        self.params.append((owner, name, owner._parameters[name]))
        owner._parameters[name] = new

    def set_requires_grad(self, p: nn.Parameter, flag: bool) -> None:
        if id(p) not in self.flags:
            self.flags[id(p)] = (p, p.requires_grad, _copy(p.grad))
        p.requires_grad_(flag)

    def train(self, owner: nn.Module, name: str) -> None:
        """Make the base parameter ``owner.<name>`` trainable; its value is restored at undo."""
        p = owner._parameters[name]
        if p is None:
            return
        self.snapshot(owner, "_parameters", name)
        self.set_requires_grad(p, True)

    def snapshot(self, owner: nn.Module, store: str, name: str) -> None:
        """Keep a copy of the tensor ``owner.<store>[name]`` (a parameter or buffer that changes while attached)."""
        t = getattr(owner, store)[name]
        if t is not None and id(t) not in self.values:
            self.values[id(t)] = (owner, store, name, t, t.detach().clone())

    def set_attr(self, obj: object, name: str, value: object) -> None:
        """Set a plain attribute (kept in the object's ``__dict__``)."""
        had = name in obj.__dict__
        self.attrs.append((obj, name, had, obj.__dict__.get(name)))
        setattr(obj, name, value)

    # -- undoing ----------------------------------------------------------------------------------
    @torch.no_grad()
    def undo(self) -> None:
        """Revert this record's changes, latest first (not the ``previous`` record's)."""
        for owner, store, name, t, saved in self.values.values():
            getattr(owner, store)[name] = t
            t.copy_(saved)
        for owner, name, old in reversed(self.params):
            owner._parameters[name] = old
        for parent, child, original in reversed(self.modules):
            parent._modules[child] = original
        for p, flag, grad in self.flags.values():
            p.requires_grad_(flag)
            p.grad = grad
        for obj, name, had, value in reversed(self.attrs):
            if had:
                obj.__dict__[name] = value
            else:
                obj.__dict__.pop(name, None)
        for m, mode in self.training:
            m.training = mode

    def chain(self) -> Iterator[Attachment]:
        """This record and the earlier ones it stacks on, latest first."""
        record: Attachment | None = self
        while record is not None:
            yield record
            record = record.previous


def _copy(grad: torch.Tensor | None) -> torch.Tensor | None:
    return None if grad is None else grad.detach().clone()


def attached(model: nn.Module) -> Attachment | None:
    """The latest record of an inject into ``model``, or None."""
    record = model.__dict__.get(ATTACHED)
    return record if isinstance(record, Attachment) else None


def keep(model: nn.Module, record: Attachment) -> None:
    model.__dict__[ATTACHED] = record


def forget(model: nn.Module) -> None:
    """Drop the records (after ``merge_and_unload``, which keeps what was trained)."""
    model.__dict__.pop(ATTACHED, None)


def undo_all(model: nn.Module) -> None:
    """Undo every record on ``model``, latest first, and drop them."""
    record = attached(model)
    assert record is not None, "undo_all needs an attached model"
    for r in record.chain():
        r.undo()
    forget(model)
