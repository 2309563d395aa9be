"""The package version, in a module of its own so that any module can read it without importing the package
root (which imports nearly everything: `from . import __version__` in a submodule is an import cycle)."""

__version__ = "0.1.0"
