"""New files a model commit must never take in (DESIGN 3.2): secrets and data.

Secrets are judged here by name and path (`.env`, `.envrc`, private keys, token and credential
files, anything under `secrets/`, `.kube/config`, ...); `secret_scan` adds the content of every
new or changed file and the allow-list. Data is judged by extension (microscopy stacks, arrays,
weights, archives), wherever it lies, not only under the data root. Files already in HEAD are
never refused by name: committing one was the user's decision.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import PurePosixPath

# Lower-case file-name patterns.
NAME_PATTERNS = (
    ".env", ".env.*", "*.env", ".envrc",
    "id_rsa", "id_dsa", "id_ecdsa", "id_ed25519", "id_ecdsa_sk", "id_ed25519_sk",
    "*.pem", "*.key", "*.p12", "*.pfx", "*.jks", "*.keystore", "*.ppk", "*.kdbx", "*.ovpn",
    ".netrc", "_netrc", ".pgpass", ".htpasswd", ".git-credentials", ".pypirc", ".npmrc",
    "credentials", "credentials.*", "*credentials*.json", "client_secret*.json",
    "*credentials*.txt", "*credentials*.ini", "*credentials*.cfg", "*credentials*.yaml",
    "*credentials*.yml", "*credentials*.toml", "*credentials*.csv", "*credentials*.db",
    "service-account*.json", "*.tfvars", "secrets.json", "secrets.yaml", "secrets.yml",
    "secrets.toml", "secrets.ini", "*.secret", "*.secrets", ".secrets",
    "token", "tokens", ".token", "*.token", "*token.txt", "*tokens.txt", "*token.json",
    ".vault-token", "kubeconfig", "*.kubeconfig", ".dockercfg", ".databrickscfg", ".s3cfg",
    ".boto", "htpasswd",
)
# Lower-case path patterns, matched against the path and every tail of it: folders that hold
# credentials, and tools' files that do.
PATH_PATTERNS = (
    "secrets/*", ".secrets/*", ".ssh/*", ".gnupg/*", ".aws/*", ".azure/*", "gcloud/*",
    ".kube/config", ".docker/config.json", "wandb/settings", ".wandb/settings",
    ".mlflow/credentials", ".huggingface/token", ".config/gh/hosts.yml",
)


# Both lists as one regex each: most files match none, and one search is cheaper than sixty.
NAME_RE = re.compile("|".join(fnmatch.translate(p) for p in NAME_PATTERNS))
PATH_RE = re.compile("|".join(fnmatch.translate(p) for p in PATH_PATTERNS))


def secret_name_reason(rel: str) -> str | None:
    """Why the new file ``rel`` (relative to the repository) looks like a secret by its name
    or path, or None."""
    path = PurePosixPath(rel.lower())
    if not NAME_RE.match(path.name) and not any(PATH_RE.match(tail) for tail in
                                                 tails(path)):
        return None
    for pattern in NAME_PATTERNS:
        if fnmatch.fnmatchcase(path.name, pattern):
            return f"its name matches {pattern!r}"
    for pattern in PATH_PATTERNS:
        if any(fnmatch.fnmatchcase(tail, pattern) for tail in tails(path)):
            return f"its path matches {pattern!r}"
    return None


def tails(path: PurePosixPath) -> list[str]:
    """``a/b/c`` -> ``a/b/c``, ``b/c``, ``c``: a path pattern may match below any folder."""
    return ["/".join(path.parts[i:]) for i in range(len(path.parts))]


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


def unstage_advice(paths: list[str], staged: set[str]) -> str:
    """The sentence telling to take those of ``paths`` that are ``staged`` out of the index
    (a .gitignore line alone leaves a staged file in the commit), or ''."""
    unstage = sorted({path for path in paths if path in staged})
    return (f" They are staged, so also unstage them: git rm --cached -- "
            f"{' '.join(unstage[:10])}." if unstage else "")
