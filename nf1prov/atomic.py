"""Writing a text file whole or not at all: readers see the old text or the new, never a mix.

Used for the README catalogue (`nf1prov.catalog`) and the `<stem>_nf1prov.json` a prediction
writes last (`nf1prov.segment.files`), whose presence says a stack is done.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from nf1prov.errors import UserError


def write_target(path: Path) -> Path:
    """The file a write to ``path`` must replace: the end of its symlink chain (a dangling link
    names the file to create), else ``path`` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file beside the real file and os.replace; keeps the file mode.

    A symlinked README stays a link: the temp file goes in the target's folder and replaces the
    target, so readers see the old or the new text, never a mix.
    """
    path = Path(path)
    target = write_target(path)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    except OSError as exc:
        raise UserError(f"Cannot write {path}: {exc}. Fix the file (or its symlink).") from exc
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"Cannot write {path} (a temporary file in {target.parent}: {exc}); "
                        "check that the folder exists and is writable.") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
