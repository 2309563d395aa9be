"""allocmoe: run a Mixture-of-Experts model under an expert-activation budget (Alloc-MoE).

    model, tok, _ = allocmoe.load_model()                        # or AutoModelForCausalLM.from_pretrained(...)
    plan = allocmoe.allocate(model, budget=0.5, token_policy="global", tokenizer=tok)
    with allocmoe.apply(model, plan) as handle:                  # in place; leaving restores the original
        print(allocmoe.evaluate(model, tokenizer=tok)["perplexity"], handle.counts())
"""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AllocMoeError, BudgetError, CalibrationError, DataError, DependencyError, FileFormatError, ModelLoadError,
    ModelMismatchError, NoMoELayersError, OutputExistsError, PlanError, ProfileError, SettingsError,
    UnsupportedModelError,
)
from .adapters import find_moe_layers  # noqa: E402
from .models import load_model  # noqa: E402
from .policies import TOKEN_POLICIES, TokenPolicy, register_policy  # noqa: E402
from .plan import Plan, full_plan, make_plan  # noqa: E402
from .patching import AppliedPlan, applied_plan, apply  # noqa: E402
from .profiling import Profile, profile  # noqa: E402
from .methods import METHODS, AllocationMethod, register_method  # noqa: E402
from .planning import add_compensation, allocate  # noqa: E402
from .evaluation import evaluate  # noqa: E402

__all__ = [
    "apply", "applied_plan", "AppliedPlan", "allocate", "add_compensation", "evaluate", "load_model", "profile", "Profile", "Plan",
    "make_plan", "full_plan", "find_moe_layers", "TOKEN_POLICIES", "TokenPolicy", "register_policy", "METHODS",
    "AllocationMethod", "register_method", "AllocMoeError", "BudgetError", "CalibrationError", "DataError",
    "DependencyError", "FileFormatError", "ModelLoadError", "ModelMismatchError", "NoMoELayersError",
    "OutputExistsError", "PlanError", "ProfileError", "SettingsError", "UnsupportedModelError",
]
