"""The plain-JSON spec a parent process hands a child process on stdin (training, search
workers): no arguments on a command line where `ps` would show them, one version number."""

from __future__ import annotations

import json
import sys


def read(cls, version: int, what: str):
    """``cls(**spec)`` from the JSON on stdin, or None after saying why on stderr (a spec
    written by another version of nf1prov)."""
    data = json.loads(sys.stdin.read())
    if data.get("version") != version:
        print(f"nf1prov: error: {what} spec version {data.get('version')} is not {version}: "
              "this commit's nf1prov cannot run it.", file=sys.stderr)
        return None
    return cls(**data)
