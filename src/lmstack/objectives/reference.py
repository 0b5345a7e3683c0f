"""The reference model of DPO, PPO and GRPO, without a second copy of the base weights.

With a peft adapter the reference is the policy with its adapter disabled; after
full fine-tuning it is a frozen copy taken once at the start.

Deferred imports, for start-up time: peft (and the lmstack modules that load it) are
imported inside the functions that need it; the CLI's input checks import this module first.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch


@contextmanager
def eval_mode(model: torch.nn.Module):
    """Dropout off inside; each submodule's own mode is put back afterwards (a loaded model
    may mix modes, which a plain ``train()`` would flatten)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


def is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def frozen_reference(model: torch.nn.Module, needed: bool = True) -> torch.nn.Module | None:
    """A frozen eval-mode copy when there is no adapter to switch off, else None."""
    if not needed or is_peft(model):
        return None
    return copy.deepcopy(model).requires_grad_(False).eval()


@contextmanager
def reference_of(policy: torch.nn.Module, frozen: torch.nn.Module | None):
    """The module that computes reference outputs: the frozen copy, or the policy in eval
    mode with its adapter disabled (dropout off; modes and adapter restored after)."""
    if frozen is not None:
        yield frozen
        return
    with eval_mode(policy), policy.disable_adapter():
        yield policy


def keep_frozen_in_eval(*modules: torch.nn.Module | None) -> None:
    """Fixed functions get no dropout, whatever mode Lightning asks of their parent."""
    for module in modules:
        if module is not None:
            module.eval()
