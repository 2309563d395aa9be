"""Exception types. Every user-facing failure is one of these, with a one-line message.

Messages are in the terms of the Python API (parameter names such as `seq_len`, `force`). An error about
one parameter names it in `param`; the CLI catches `AllocMoeError`, prints `error: <message>` with exit
code 2 and adds the matching command-line flag as a hint (allocmoe.cli owns the flag names).
"""


class AllocMoeError(Exception):
    """Base class: a problem with the user's input that the CLI reports in one line."""

    def __init__(self, message: str = "", *, param: str | None = None):
        super().__init__(message)
        self.param = param  # the API parameter the problem is about, if one


class SettingsError(AllocMoeError):
    """An argument has an invalid value (unknown name, out of range, wrong combination)."""


class ModelLoadError(AllocMoeError):
    """A model cannot be found or loaded."""


class DependencyError(AllocMoeError):
    """An optional dependency is missing."""


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


class CalibrationError(AllocMoeError):
    """A calibrated token policy cannot be tuned to its budget on the given text."""


class DataError(AllocMoeError):
    """Calibration or evaluation data is missing, empty or too short."""


class FileFormatError(AllocMoeError):
    """A JSON file cannot be parsed or lacks required fields."""


class OutputExistsError(AllocMoeError):
    """Refusing to overwrite something the user already has."""


class OutputPathError(AllocMoeError):
    """An output path cannot be written: a directory, under a regular file, or in a folder that refuses files."""
