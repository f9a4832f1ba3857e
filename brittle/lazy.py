"""Names of a package imported on first use (PEP 562), so that imports follow use.

``import brittle`` or ``import brittle.attacks`` loads none of the modules behind
the names; the first look-up of a name imports the one module that defines it.
A submodule is found the same way, as an attribute of its package.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, where: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of a package whose names load on first use.

    Args:
        package: The package's ``__name__``.
        where: Public name -> the module that defines it.

    Returns:
        The module-level ``__getattr__`` and ``__dir__`` functions.

    Examples:
        >>> getattr_, dir_ = lazy_exports("brittle", {"wrap": "brittle.monitor"})
        >>> getattr_("wrap").__name__
        'wrap'
        >>> getattr_("no_such_name")
        Traceback (most recent call last):
        ...
        AttributeError: module 'brittle' has no attribute 'no_such_name'
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
        # A dotted or otherwise odd name is no submodule: find_spec would import its
        # "parent" and raise ModuleNotFoundError where getattr(pkg, name, None) expects
        # an AttributeError.
        elif (
            name.isidentifier()
            and not name.startswith("_")
            and importlib.util.find_spec(f"{package}.{name}")
        ):
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later look-ups skip this function
        return value

    def __dir__() -> list[str]:
        # __all__ also names submodules (brittle.functional) not yet imported.
        return sorted(set(namespace) | set(where) | set(namespace.get("__all__", ())))

    return __getattr__, __dir__
