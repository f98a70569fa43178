"""Files the user's own command line is writing while `nf1prov train` runs.

`nf1prov train --json > model.json` or `... | tee train.log` inside the repository: the shell
creates the file before nf1prov starts, so a model commit would take it half-written and leave
the tree dirty after. Such a file is one this process holds open for writing (its standard
output or error), or one another process of its process group (the rest of the shell's
pipeline, e.g. `tee`) does, read from /proc on Linux; what cannot be read is skipped. Files are
compared by device and inode, so a name or a symlink cannot hide them.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

PROC = Path("/proc")


def own_written_files() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the regular files this process has open for writing."""
    try:
        fds = [int(name) for name in os.listdir("/dev/fd")]
    except OSError:
        fds = [1, 2]
    found = set()
    for fd in fds:
        try:
            info = os.fstat(fd)
            writing = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor)
        if writing and stat.S_ISREG(info.st_mode):
            found.add((info.st_dev, info.st_ino))
    return found


def group_written_files() -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the regular files the other processes of this process group have
    open for writing (Linux /proc; nothing elsewhere or where permission is lacking)."""
    group, me = os.getpgrp(), os.getpid()
    found = set()
    try:
        pids = [int(name) for name in os.listdir(PROC) if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        if pid != me and process_group(pid) == group:
            found |= written_by(pid)
    return found


def process_group(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:  # plain open: one per process
            data = handle.read()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[2]) if len(fields) > 2 else None


def written_by(pid: int) -> set[tuple[int, int]]:
    found = set()
    fd_dir = PROC / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return found
    for fd in fds:
        try:
            info = os.stat(fd_dir / fd)
            flags = (PROC / str(pid) / "fdinfo" / fd).read_text()
        except OSError:
            continue
        mode = next((int(line.split()[1], 8) for line in flags.splitlines()
                     if line.startswith("flags:")), 0)
        if mode & os.O_ACCMODE != os.O_RDONLY and stat.S_ISREG(info.st_mode):
            found.add((info.st_dev, info.st_ino))
    return found


def being_written(root: Path, rels: list[str]) -> list[str]:
    """Those of ``rels`` (files the model commit would take) that this command line's own
    redirect or pipeline is writing."""
    if not rels:
        return []
    written = own_written_files() | group_written_files()
    found = []
    for rel in rels:
        try:
            info = os.lstat(Path(root) / rel)  # a link is committed as a link
        except OSError:
            continue
        if (info.st_dev, info.st_ino) in written:
            found.append(rel)
    return found
