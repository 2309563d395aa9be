"""The one registry type behind the extension points (allocation methods, token policies): a name -> instance
table that a class decorator fills, and a lookup whose error names the valid choices. Every list of names
elsewhere (CLI help, the main job's configurations, plan validation) is read from these tables."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, what: str, error: type[Exception], **error_kwargs):
        super().__init__()
        self.what, self.error, self.error_kwargs = what, error, error_kwargs

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: one instance of `cls` under `cls.name`."""
        if cls.name in self:
            raise ValueError(f"{self.what} {cls.name!r} is already registered")
        self[cls.name] = cls()
        return cls

    def lookup(self, name: str) -> T:
        try:
            return self[name]
        except KeyError:
            raise self.error(f"unknown {self.what} {name!r} (choose from {', '.join(self)})",
                             **self.error_kwargs) from None
