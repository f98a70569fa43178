"""The two errors a user can meet; `nf1prov.cli.main` turns them into a message and an exit code.

Raise `UserError` for anything the user can fix (bad file, bad value, dirty tree): exit 2.
Raise `CheckFailed` when a check ran and found a problem (e.g. a stale README): exit 1.
Messages are one paragraph that names the offending file or value and says what to do.
"""


class Nf1provError(Exception):
    exit_code = 2


class UserError(Nf1provError):
    """Usage or input error: names the file/value and the fix. Exit code 2."""

    exit_code = 2


class CheckFailed(Nf1provError):
    """A check ran and failed (e.g. `catalog --check` found a stale README). Exit code 1."""

    exit_code = 1


# --- a full disk ----------------------------------------------------------------------------------

# How a full filesystem reads once a library has wrapped it (sqlite: SQLITE_FULL).
DISK_FULL_TEXT = ("database or disk is full", "no space left on device", "disk quota exceeded")


class DiskFull(UserError):
    """A write found no room: the message names the path and its filesystem's free space."""


def disk_full(exc: BaseException | None, database=None, files=None) -> DiskFull | None:
    """A `DiskFull` for ``exc`` when it (or what caused it) is a full filesystem (ENOSPC,
    EDQUOT, sqlite's "database or disk is full"), else None. The path named is the file the
    error names (a copy's destination); else, for sqlite's error, ``database`` (the store's
    file) and for a file write that names no file, ``files`` (e.g. the run's artifacts)."""
    import errno

    seen, named, wrote, sqlite = set(), None, False, False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFull):
            return exc
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            wrote, named = True, named or exc.filename2 or exc.filename
        elif any(text in str(exc).lower() for text in DISK_FULL_TEXT):
            sqlite = sqlite or "database or disk is full" in str(exc).lower()
            wrote = wrote or not sqlite
        exc = exc.__cause__ or exc.__context__
    if not (wrote or sqlite):
        return None
    first, second = (database, files) if sqlite and not wrote else (files, database)
    path = named or first or second
    if path is None:
        return DiskFull("A disk is full (no space left on device): free space, then retry.")
    return DiskFull(f"The disk holding {path} is full ({free_space(path)}): free space there, "
                    "or move it to a larger disk.")


def local_folder(uri: str | None):
    """The folder of a local artifact URI (``file:///...`` or a plain path), else None."""
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    if not uri:
        return None
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme in ("", "file") else None


def free_space(path) -> str:
    """'<free> free of <total>' on the filesystem of ``path`` (or of its nearest existing
    folder)."""
    import shutil
    from pathlib import Path

    folder = Path(path)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        usage = shutil.disk_usage(folder)
    except OSError:
        return "free space unknown"
    return f"{human_bytes(usage.free)} free of {human_bytes(usage.total)}"


def human_bytes(count: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while count >= 1000 and power < len(units) - 1:
        count, power = count / 1000, power + 1
    return f"{count:.0f} B" if power == 0 else f"{count:.1f} {units[power]}"


class HideDiskFullTracebacks:
    """A logging filter for MLflow's store logger, which logs a full disk as ERROR with a
    traceback of 40 lines before raising it: nf1prov reports it once, naming the path."""

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return disk_full(exc) is None and not any(
            text in record.getMessage().lower() for text in DISK_FULL_TEXT)


def quiet_disk_full_logging() -> None:
    """Install `HideDiskFullTracebacks` on MLflow's store logger (once per process)."""
    import logging

    logger = logging.getLogger("mlflow.store.db.utils")
    if not any(isinstance(f, HideDiskFullTracebacks) for f in logger.filters):
        logger.addFilter(HideDiskFullTracebacks())
