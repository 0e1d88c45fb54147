"""Package namespaces that import their members on first use.

``lowbit --help`` must answer in well under a second, and importing torch alone takes
more than that, so no package ``__init__`` that the CLI passes through may import torch.
Each one lists its public names and the module that defines them; a name is imported the
first time it is read (PEP 562).
"""

from __future__ import annotations

import importlib


def lazy_exports(package: str, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package``, serving ``exports`` (name -> module)."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
