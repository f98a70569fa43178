"""Files that ship with nf1prov but live outside the Python packages: `templates/` and
`configs/`. In a source checkout (or editable install) they are the repository's own folders;
in a wheel they are copied into the package by pyproject's force-include.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """The shipped ``templates`` or ``configs`` folder."""
    for candidate in (_PACKAGE / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"nf1prov's {name}/ folder is missing from {_PACKAGE}: reinstall "
                            "nf1prov.")
