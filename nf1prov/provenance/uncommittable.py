"""New files a model commit must never take in (DESIGN 3.2): secrets and data.

Secrets are judged by name (`.env`, private keys, credential and password files) and, for small
files, by a private key block in the content; data by extension (microscopy stacks, arrays,
weights, archives), wherever it lies, not only under the data root. Files already in HEAD are
never refused: committing one was the user's decision, and that is also how a false positive is
allowed (commit it yourself once, e.g. a `.env.example` of placeholders or a small test image).
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path, PurePosixPath

# Lower-case file-name patterns.
NAME_PATTERNS = (
    ".env", ".env.*", "*.env",
    "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk",
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk", "*.kdbx", "*.ovpn",
    ".netrc", "_netrc", ".pgpass", ".htpasswd", ".git-credentials", ".pypirc", ".npmrc",
    "credentials", "credentials.*", "*credentials*.json", "client_secret*.json",
    "service-account*.json", "*.tfvars", "secrets.json", "secrets.yaml", "secrets.yml",
    "secrets.toml", "secrets.ini", "*.secret", "*.secrets", ".secrets",
)
# A PEM private key block: a line of its own, as key files have it.
PRIVATE_KEY_BLOCK = re.compile(rb"^-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----\r?$",
                               re.MULTILINE)
CONTENT_SCAN_BYTES = 1 << 20  # larger files are data, not key files


def secret_reason(path: Path, rel: str) -> str | None:
    """Why ``path`` (``rel`` to the repository) looks like a secret, or None."""
    name = PurePosixPath(rel).name.lower()
    for pattern in NAME_PATTERNS:
        if fnmatch.fnmatchcase(name, pattern):
            return f"its name matches {pattern!r}"
    try:
        small = path.stat().st_size <= CONTENT_SCAN_BYTES
        if small and PRIVATE_KEY_BLOCK.search(path.read_bytes()):
            return "it holds a private key"
    except OSError:
        return None
    return None


# Lower-case suffixes of data, weights and archives: they belong in a data root, an artifact
# store or .nf1prov/, never in the code commit.
DATA_SUFFIXES = (
    ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".czi", ".nd2", ".lif", ".lsm", ".ims", ".zarr",
    ".npy", ".npz", ".h5", ".hdf5", ".mat", ".pt", ".pth", ".ckpt", ".onnx", ".safetensors",
    ".pkl", ".pickle", ".joblib", ".zip", ".tar", ".gz", ".tgz", ".7z",
)


def data_reason(rel: str) -> str | None:
    """Why ``rel`` looks like data or weights (its suffix), or None."""
    name = PurePosixPath(rel).name.lower()
    for suffix in DATA_SUFFIXES:
        if name.endswith(suffix):
            return f"a {suffix} file"
    return None


def data_among(rels: list[str]) -> list[tuple[str, str]]:
    """[(path, reason)] for those of ``rels`` (new files to commit) that look like data."""
    return [(rel, reason) for rel in rels if (reason := data_reason(rel))]


def secrets_among(root: Path, rels: list[str]) -> list[tuple[str, str]]:
    """[(path, reason)] for those of ``rels`` (new files to commit) that look like secrets."""
    found = []
    for rel in rels:
        reason = secret_reason(Path(root) / rel, rel)
        if reason:
            found.append((rel, reason))
    return found
