"""The code a model trains with is the code its commit holds (DESIGN 3.2), by construction.

After the model commit, the commit's own `nf1prov/`, `models/`, `templates/` and `configs/` are
written into a fresh temporary folder (from git's objects, not from the work tree) and the
training process imports from there, first on its `sys.path`. So an edit made in the work tree
after the commit, a module imported late, a DataLoader worker started with spawn, or an
`nf1prov` installed from another checkout can never run in its place; and the training process
checks, before it starts and again before the run is FINISHED, that every `nf1prov`/`models`
module it imported lies in that folder.
"""

from __future__ import annotations

import ast
import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nf1prov import git
from nf1prov.code_origin import PACKAGES, foreign_modules
from nf1prov.errors import UserError

CODE_PATHS = [*PACKAGES, "templates", "configs"]
# The files a repository must hold for its commits to be trainable.
REQUIRED_FILES = ("nf1prov/__init__.py", "nf1prov/provenance/worker.py", "models/__init__.py")


def missing_code(root: Path) -> list[str]:
    """Files of REQUIRED_FILES the next model commit would not hold (absent or git-ignored)."""
    return [path for path in REQUIRED_FILES
            if not (Path(root) / path).is_file() or git.is_ignored(root, path)]


def ignored_code(root: Path) -> list[str]:
    """Source files of the packages that git ignores: the commit would lack them, so the
    training could not import them (byte-code caches aside)."""
    return [path for path in git.ignored_files(root, list(PACKAGES))
            if not path.endswith((".pyc", ".pyo")) and "__pycache__/" not in path]


def check_tree_holds_code(root: Path) -> None:
    """Preflight: the model commit must hold the training code itself, all of it."""
    ignored = ignored_code(root)
    if ignored:
        rules = "; ".join(f"{path} by {rule}" for path, rule in
                          ((p, git.ignore_rule(root, p)) for p in ignored[:5]))
        raise UserError(
            f"{len(ignored)} file(s) of the training code in {root} are git-ignored ({rules}), "
            "so the model commit would not hold them and the training could not run them. "
            "Change those .gitignore lines (anchor them with a leading '/', e.g. '/data/' "
            "instead of 'data/'), then train again."
        )
    missing = missing_code(root)
    if missing:
        raise UserError(
            f"The repository {root} does not hold nf1prov's training code ({', '.join(missing)} "
            "missing or git-ignored). A model commit must hold exactly the code that trains "
            "it, so nf1prov trains only from the nf1prov/ and models/ packages of the "
            "repository it commits to: work in a clone of the nf1prov repository (or copy its "
            "nf1prov/ and models/ folders into this one), then train again."
        )


def architecture_names(root: Path) -> list[str] | None:
    """The keys of ``ARCHITECTURES`` in the repository's ``models/__init__.py``, read from its
    source without importing it (torch). None when the source does not settle them: the dict is
    not one literal with string keys, or the module mentions ``ARCHITECTURES`` anywhere else
    (``ARCHITECTURES["x"] = X``, ``.update``, an import); the training process then checks the
    name when it builds the network."""
    try:
        tree = ast.parse((Path(root) / "models" / "__init__.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    mentions = [node for node in ast.walk(tree)
                if isinstance(node, ast.Name) and node.id == "ARCHITECTURES"
                or isinstance(node, ast.alias) and "ARCHITECTURES" in (node.name, node.asname)]
    if len(mentions) != 1:
        return None
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Dict):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if mentions[0] in targets:
                keys = node.value.keys
                if all(isinstance(k, ast.Constant) and isinstance(k.value, str) for k in keys):
                    return sorted(k.value for k in keys)
    return None


def check_architecture(root: Path, config: dict, source: str) -> None:
    """Preflight: ``model.architecture`` names a class in the repository's own models package
    (the code the commit will hold, not an installed copy). ``source`` names where the value
    came from (the config file or its --set)."""
    name = config["model"]["architecture"]
    known = architecture_names(root)
    if known is not None and name not in known:
        raise UserError(f"{source}: model.architecture {name!r} is not in ARCHITECTURES of "
                        f"{Path(root) / 'models' / '__init__.py'} (known: {', '.join(known)}). "
                        "Set model.architecture to one of those, or add the class there.")


def check_commit_holds_code(root: Path, sha: str, name: str) -> None:
    missing = [path for path in REQUIRED_FILES if not git.file_in_tree(root, sha, path)]
    if missing:
        raise UserError(
            f"Model {name}'s commit {sha[:12]} does not hold {', '.join(missing)}, so its "
            "training code cannot be run as it was committed. Train a new model instead."
        )


@contextlib.contextmanager
def snapshot(root: Path, sha: str) -> Iterator[Path]:
    """A temporary folder holding the code of commit ``sha``, files read-only; removed after."""
    folder = Path(tempfile.mkdtemp(prefix=f"nf1prov-code-{sha[:12]}-"))
    try:
        git.extract_tree(root, sha, CODE_PATHS, folder)
        for directory, _, files in os.walk(folder):
            for name in files:
                path = Path(directory) / name
                path.chmod(stat.S_IMODE(path.stat().st_mode) & ~0o222)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def check_modules_from(code_root: Path) -> None:
    """Raise UserError naming every `nf1prov`/`models` module not imported from ``code_root``."""
    foreign = foreign_modules(code_root)
    if foreign:
        shown = "; ".join(f"{name} from {path}" for name, path in foreign[:8])
        raise UserError(
            f"The training imported code that is not the model commit's ({shown}), so the "
            f"model would not be the code its commit holds ({code_root}). Remove whatever puts "
            "another nf1prov or models package ahead on sys.path (a .pth file, sitecustomize), "
            "then train again."
        )
