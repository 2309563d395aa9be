"""allocmoe: run a Mixture-of-Experts model under an expert-activation budget (Alloc-MoE).

    model, tok, _ = allocmoe.load_model()                        # or AutoModelForCausalLM.from_pretrained(...)
    plan = allocmoe.allocate(model, budget=0.5, token_policy="global", tokenizer=tok)
    with allocmoe.apply(model, plan) as handle:                  # in place; leaving restores the original
        print(allocmoe.evaluate(model, tokenizer=tok)["perplexity"], handle.counts())
"""

from ._version import __version__
from .errors import (
    AllocMoeError, BudgetError, CalibrationError, DataError, DependencyError, FileFormatError, ModelLoadError,
    ModelMismatchError, NoMoELayersError, OutputExistsError, OutputPathError, PlanError, ProfileError, SettingsError,
    UnsupportedModelError,
)
from .adapters import find_moe_layers
from .models import load_model
from .policies import TOKEN_POLICIES, TokenPolicy, register_policy
from .plan import Plan, full_plan, make_plan
from .patching import AppliedPlan, applied_plan, apply
from .profiling import Profile, profile
from .methods import METHODS, AllocationMethod, register_method
from .recipe import Recipe
from .planning import add_compensation, allocate
from .evaluation import evaluate

__all__ = [
    "apply", "applied_plan", "AppliedPlan", "allocate", "add_compensation", "evaluate", "load_model", "profile", "Profile", "Plan",
    "make_plan", "full_plan", "find_moe_layers", "TOKEN_POLICIES", "TokenPolicy", "register_policy", "METHODS",
    "AllocationMethod", "register_method", "AllocMoeError", "BudgetError", "CalibrationError", "DataError",
    "DependencyError", "FileFormatError", "ModelLoadError", "ModelMismatchError", "NoMoELayersError",
    "OutputExistsError", "OutputPathError", "PlanError", "ProfileError", "SettingsError", "UnsupportedModelError",
    "Recipe",
]
