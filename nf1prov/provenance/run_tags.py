"""The MLflow tags of a model run (DESIGN 3.3) and of its environment.

`creation_tags` are set when the run is created, before anything can fail, so that even a run
that never trained is described; `git_tags` and `source_tags` are set once the model commit
exists (they overwrite whatever `mlflow.source.git.commit` MLflow guessed when it started the
run, and what `mlflow run` put in Source and Created by).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import platform
import socket
import sys
from importlib import metadata
from pathlib import Path

from nf1prov import git, threads, tracking
from nf1prov.provenance import heartbeat

# Environment tags (nf1prov's own, not contract).
ENV_PYTHON = "nf1prov.env.python"
ENV_TORCH = "nf1prov.env.torch"
ENV_CUDA = "nf1prov.env.cuda"
ENV_GPU = "nf1prov.env.gpu"
ENV_PLATFORM = "nf1prov.env.platform"
ENV_THREADS = "nf1prov.env.torch_threads"  # CPU results depend on it: `reproduce` reuses it
ENV_OPENMP = "nf1prov.env.openmp"  # the OpenMP variables it started with (`nf1prov.threads`)

PIP_FREEZE_ARTIFACT = "environment/pip-freeze.txt"
UNCOMMITTED_DIFF_ARTIFACT = "git/uncommitted.diff"


def creation_tags(kind: str, description: dict) -> dict[str, str]:
    """Kind, description (tags and Markdown note), host, pid and first heartbeat."""
    from nf1prov.description import description_markdown, description_tags

    tags = {tracking.KIND: kind, tracking.NOTE_CONTENT: description_markdown(description)}
    tags.update(description_tags(description))
    tags.update(heartbeat.identity_tags())
    return tags


def git_tags(root: Path, sha: str | None, dirty: bool, codename: str | None) -> dict[str, str]:
    """The git part of DESIGN 3.3. ``codename`` None: no model tag (a --no-commit run)."""
    tags = {tracking.GIT_DIRTY: "true" if dirty else "false"}
    if sha:
        tags[tracking.GIT_COMMIT] = sha
    branch = git.current_branch(root)
    if branch:
        tags[tracking.GIT_BRANCH] = branch
    url = git.remote_url(root)
    if url:  # a token in an https remote must not reach the store
        tags[tracking.GIT_REPO_URL] = tracking.public_uri(url)
    if codename:
        tags[tracking.GIT_TAG] = git.model_tag(codename)
    return tags


def source_tags(root: Path) -> dict[str, str]:
    """What MLflow's UI shows as a run's Source and Created by (DESIGN 3.3).

    The source is an MLflow PROJECT named by its `origin` URL (credentials removed) or, with
    no remote, its folder: the way `mlflow run` names a project. For a PROJECT the run page
    shows the name's last part with the branch and commit tags beside it, and links a GitHub,
    GitLab or Bitbucket URL to the repository and the commit. The user is the git author
    identity the model is committed as ("Name <email>"), else the OS login.
    """
    url = git.remote_url(root)
    tags = {tracking.SOURCE_TYPE: "PROJECT",
            tracking.SOURCE_NAME: tracking.public_uri(url) if url else str(root)}
    author = git.identity(root, author=True)
    if author:
        tags[tracking.USER] = f"{author[0]} <{author[1]}>"
    else:
        with contextlib.suppress(OSError, KeyError):  # no login name known: leave it out
            tags[tracking.USER] = getpass.getuser()
    return tags


def environment_tags() -> dict[str, str]:
    """Python, torch, CUDA and GPU name, platform and host."""
    tags = {ENV_PYTHON: platform.python_version(), ENV_PLATFORM: platform.platform(),
            tracking.HOST: socket.gethostname()}
    try:
        import torch

        tags[ENV_TORCH] = torch.__version__
        tags[ENV_CUDA] = torch.version.cuda or "none"
        tags[ENV_GPU] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        tags[ENV_THREADS] = str(torch.get_num_threads())
        tags[ENV_OPENMP] = threads.openmp_settings(os.environ)
    except ImportError:  # pragma: no cover - torch is a dependency
        tags[ENV_TORCH] = "not installed"
    return tags


def pip_freeze() -> str:
    """Installed distributions as ``name==version`` lines (pip freeze's format), sorted.

    Read from the interpreter's own metadata, which is what `pip freeze` reads too, without
    starting a subprocess (pip may not even be installed in the environment).
    """
    lines = {f"{dist.metadata['Name']}=={dist.version}" for dist in metadata.distributions()
             if dist.metadata["Name"]}
    return "\n".join(sorted(lines, key=str.lower)) + "\n"


def log_text(client, run_id: str, text: str, artifact_file: str) -> None:
    client.log_text(run_id, text, artifact_file)


def log_environment(client, run_id: str, argv: list[str] | None = None) -> None:
    """Environment tags, `pip freeze` and the command line (``argv``: default this process's)."""
    for key, value in environment_tags().items():
        client.set_tag(run_id, key, value)
    log_text(client, run_id, pip_freeze(), PIP_FREEZE_ARTIFACT)
    argv = sys.argv[1:] if argv is None else argv
    # whole, split if long (a resume writes its own, shorter command line over it)
    tracking.log_tags(client, run_id, {"nf1prov.env.argv": json.dumps(argv)}, rewritable=True)


def failure_line(text: str) -> str:
    """A one-line failure reason (first non-empty line, at most 500 characters)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = " | ".join(lines[:3]) if lines else "unknown error"
    return line[:500]
