"""Exception types. Every user-facing failure is one of these, with a one-line message.

The CLI catches `AllocMoeError` and prints `error: <message>` with exit code 2, so the message must
name the problem on its own (which file, which value, what was expected).
"""


class AllocMoeError(Exception):
    """Base class: a problem with the user's input that the CLI reports in one line."""


class NoMoELayersError(AllocMoeError):
    """The model has no MoE block that allocmoe can find."""


class UnsupportedModelError(AllocMoeError):
    """The model has MoE blocks, but their routing cannot be reduced in a way that saves compute."""


class PlanError(AllocMoeError):
    """A plan is malformed, of an unknown version, or has values out of range."""


class ModelMismatchError(PlanError):
    """A plan or profile was made for a different model."""


class BudgetError(AllocMoeError):
    """A budget is out of the feasible range."""


class ProfileError(AllocMoeError):
    """A profile file is malformed or does not fit the model."""


class DataError(AllocMoeError):
    """Calibration or evaluation data is missing, empty or too short."""


class FileFormatError(AllocMoeError):
    """A JSON file cannot be parsed or lacks required fields."""


class OutputExistsError(AllocMoeError):
    """Refusing to overwrite something the user already has."""
