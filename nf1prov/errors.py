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
