"""The allocation-method interface and its registry (`METHODS`), apart from the methods themselves.

Methods in modules of their own (search.py) import their base class from here, and methods.py, which holds
the built-in methods, imports them so that `METHODS` is complete once methods.py is imported; neither needs
the other's module, so there is no import cycle.

A method gets an `AllocationContext` (budget, candidate k values, the profile if it needs one, the model
if it needs one, seed, calibration windows) and returns one k per MoE layer with sum == B. It may add
information to `ctx.meta`, which ends up in the plan's `meta`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import SettingsError
from .registry import Registry


@dataclass
class AllocationContext:
    budget: int  # B, activations per token summed over MoE layers
    k_values: list[int]
    num_layers: int
    profile: object | None = None  # profiling.Profile when the method needs one
    model: nn.Module | None = None
    windows: torch.Tensor | None = None  # calibration windows (methods that score plans on text)
    seed: int = 0
    progress: bool = True
    token_policy: dict | None = None  # the plan's token policy (methods that score whole plans use it)
    meta: dict = field(default_factory=dict)


class AllocationMethod:
    name: str = "?"
    label: str = "?"  # how reports name it
    needs_profile: bool = False
    needs_model: bool = False
    needs_windows: bool = False
    in_run: bool = True  # part of the main job's comparison (with the fixed token policy)
    guarded: bool = False  # it scores plans: allocate() checks its result against uniform on held-out text (guard.py)
    summary: str = ""

    def allocate(self, ctx: AllocationContext) -> list[int]:
        raise NotImplementedError


METHODS: Registry[AllocationMethod] = Registry("allocation method", SettingsError, param="method")
register_method = METHODS.register
get_method = METHODS.lookup
