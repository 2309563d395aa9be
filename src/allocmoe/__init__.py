"""allocmoe: run a Mixture-of-Experts model under an expert-activation budget (Alloc-MoE)."""

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    AllocMoeError, BudgetError, DataError, FileFormatError, ModelMismatchError, NoMoELayersError,
    OutputExistsError, PlanError, ProfileError, UnsupportedModelError,
)
from .adapters import find_moe_layers  # noqa: E402
from .plan import Plan, full_plan, make_plan  # noqa: E402
from .apply import AppliedPlan, applied_plan, apply  # noqa: E402
from .profile import Profile, profile  # noqa: E402
from .planning import allocate  # noqa: E402

__all__ = [
    "apply", "applied_plan", "AppliedPlan", "allocate", "profile", "Profile", "Plan", "make_plan", "full_plan",
    "find_moe_layers", "AllocMoeError", "BudgetError", "DataError", "FileFormatError", "ModelMismatchError",
    "NoMoELayersError", "OutputExistsError", "PlanError", "ProfileError", "UnsupportedModelError",
]
