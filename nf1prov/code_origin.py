"""Where the imported `nf1prov` and `models` modules came from: the check that a training (or a
search worker) runs the model commit's code and nothing else (DESIGN 3.2)."""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGES = ("nf1prov", "models")


def module_paths(module) -> list[str]:
    """The files or folders a module was loaded from (a namespace package has only folders)."""
    file = getattr(module, "__file__", None)
    if file:
        return [file]
    return list(getattr(module, "__path__", None) or ["(built in)"])


def foreign_modules(code_root: Path) -> list[tuple[str, str]]:
    """[(module, path)] of every imported `nf1prov`/`models` module (and `__main__`, when it is
    one of them) not loaded from ``code_root``."""
    base = Path(code_root).resolve()
    foreign = []
    for name, module in list(sys.modules.items()):
        top = name.split(".", 1)[0]
        if top not in PACKAGES and not (name == "__main__" and getattr(
                module, "__spec__", None) and module.__spec__.name.split(".")[0] in PACKAGES):
            continue
        for path in module_paths(module):
            resolved = Path(path).resolve()
            if resolved != base and base not in resolved.parents:
                foreign.append((name, path))
    return sorted(foreign)
