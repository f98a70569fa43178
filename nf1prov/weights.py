"""A model's weights as data, and its architecture as code from git.

The run artifact ``model/`` holds two files:

- ``weights.pt``: the state dict (tensors only), read back with ``torch.load(weights_only=True)``;
- ``architecture.json``: which class to build with which arguments, and the git blob hash of the
  source file that defined it when the model was trained.

Nothing from the tracking store is ever executed: a lab's shared store must not be a way to run
code on a collaborator's machine. The class comes from the installed ``models`` package when its
source file is byte for byte the one that trained the model (the usual case), else from the git
repository, which holds that blob when it holds the model's commit (fetched from the remotes by
its ``model/<codename>`` tag when missing). So an old model runs its own ``forward()``.

An architecture module is one file under ``models/`` that imports only the standard library and
torch (``models/unet.py``); ``models.ARCHITECTURES`` maps the config's name to its class.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from nf1prov.errors import UserError

WEIGHTS_FILE = "weights.pt"
ARCHITECTURE_FILE = "architecture.json"
FORMAT = "nf1prov-state-dict/1"
PICKLED_MARKER = "MLmodel"  # what a folder of the earlier pickled-module format holds


def blob_hash(data: bytes) -> str:
    """The git blob SHA-1 of ``data`` (what ``git hash-object`` prints in a SHA-1 repository;
    a SHA-256 repository's blob names differ, so the source is then found by the model's
    commit and checked against this hash)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Architecture:
    """The class that builds a model and the arguments it was built with."""

    name: str  # the config's model.architecture, e.g. "unet"
    module: str  # e.g. "models.unet"
    class_name: str  # e.g. "UNet"
    args: dict  # keyword arguments of the constructor (JSON values)
    source_path: str  # the module's file in the repository, e.g. "models/unet.py"
    source_blob: str  # git blob SHA-1 of that file's bytes when the model was trained

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "name": self.name, "module": self.module,
                           "class": self.class_name, "args": self.args,
                           "source_path": self.source_path, "source_blob": self.source_blob},
                          indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Architecture:
        try:
            record = json.loads(text)
            if record.get("format") != FORMAT:
                raise ValueError(f"format {record.get('format')!r}, expected {FORMAT!r}")
            arch = cls(name=record["name"], module=record["module"],
                       class_name=record["class"], args=dict(record["args"]),
                       source_path=record["source_path"], source_blob=record["source_blob"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(f"{where} is not an nf1prov architecture record ({exc}). It is "
                            f"written by `nf1prov train` beside {WEIGHTS_FILE}; retrain the "
                            "model (`nf1prov reproduce CODENAME`) to get a valid one.") from None
        if not re.fullmatch(r"[0-9a-f]{40}", arch.source_blob):
            raise UserError(f"{where}: source_blob {arch.source_blob!r} is not a git blob SHA-1.")
        if not (arch.source_path.startswith("models/") and arch.source_path.endswith(".py")
                and ".." not in arch.source_path and arch.module.startswith("models.")):
            raise UserError(f"{where} names {arch.module} ({arch.source_path}); architectures "
                            "live in the repository's models/ package.")
        return arch


def describe(model) -> Architecture:
    """The `Architecture` record of ``model``, an instance of a class from ``models``; its
    constructor arguments are read from attributes of the same names."""
    cls = type(model)
    from models import ARCHITECTURES

    names = [name for name, known in ARCHITECTURES.items() if known is cls]
    if not names:
        raise UserError(f"{cls.__module__}.{cls.__qualname__} is not in models.ARCHITECTURES; "
                        "register the class there to train it.")
    parameters = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
    args = {p.name: getattr(model, p.name) for p in parameters if hasattr(model, p.name)}
    missing = [p.name for p in parameters if p.name not in args and p.default is p.empty]
    if missing:
        raise UserError(f"{cls.__qualname__} keeps no attribute for constructor argument(s) "
                        f"{', '.join(missing)}: store them as self.<name> so that the model can "
                        "be rebuilt from its weights.")
    source = Path(inspect.getsourcefile(cls))
    return Architecture(name=names[0], module=cls.__module__, class_name=cls.__qualname__,
                        args=args, source_path=cls.__module__.replace(".", "/") + ".py",
                        source_blob=blob_hash(source.read_bytes()))


def save(model, folder: Path) -> Architecture:
    """Write ``model``'s weights and architecture record into ``folder`` (created)."""
    import torch

    arch = describe(model)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().to("cpu") for name, tensor in model.state_dict().items()}
    torch.save(state, folder / WEIGHTS_FILE)
    (folder / ARCHITECTURE_FILE).write_text(arch.to_json(), encoding="utf-8")
    return arch


MLFLOW_ARTIFACTS = "artifacts"  # where an MLflow pyfunc model keeps them (DESIGN 3.11)


def model_files(folder: Path) -> Path:
    """The folder that holds ``weights.pt`` and ``architecture.json`` in a model folder:
    ``folder`` itself (runs before MLflow models: the run artifact ``model/``), or its
    ``artifacts/`` (an MLflow pyfunc model, `nf1prov.segment.mlflow_model`)."""
    folder = Path(folder)
    inner = folder / MLFLOW_ARTIFACTS
    if not (folder / ARCHITECTURE_FILE).is_file() and (inner / ARCHITECTURE_FILE).is_file():
        return inner
    return folder


def read_architecture(folder: Path, ref: str) -> Architecture:
    folder = model_files(folder)
    record = folder / ARCHITECTURE_FILE
    if not record.is_file():
        if (folder / PICKLED_MARKER).is_file():
            raise UserError(
                f"Model {ref!r} was saved by an earlier nf1prov as a pickled Python module "
                f"({folder / PICKLED_MARKER}); loading it would run code taken from the store, "
                "which nf1prov no longer does. Retrain it with its own code and data: "
                f"`nf1prov reproduce {ref}` (the new run stores plain weights).")
        raise UserError(f"{folder} holds no {ARCHITECTURE_FILE}: it is not an nf1prov model "
                        f"folder. Pass the folder holding {WEIGHTS_FILE} and {ARCHITECTURE_FILE} "
                        "(e.g. .nf1prov/models/<codename>/model), a codename or a run ID.")
    return Architecture.from_json(record.read_text(encoding="utf-8"), str(record))


def load(folder: Path, *, ref: str | None = None, device="cpu", repo: Path | None = None,
         codename: str | None = None, source: Path | None = None):
    """The model in ``folder`` (see the module docstring; `model_files`), on ``device``, in eval
    mode.

    ``repo`` is a git repository to take the architecture's source from when the installed one
    differs; ``codename`` lets a missing commit be fetched by its ``model/<codename>`` tag;
    ``source`` is a copy of the architecture's source file shipped with the model, used when its
    bytes are the recorded blob (default: the file of that name beside the weights, where an
    MLflow model keeps it, `nf1prov.segment.mlflow_model`).
    """
    import torch

    folder = model_files(Path(folder))
    ref = ref or str(folder)
    arch = read_architecture(folder, ref)
    source = source or folder / Path(arch.source_path).name
    cls = architecture_class(arch, ref=ref, repo=repo, codename=codename, source=source)
    try:
        model = cls(**arch.args)
    except TypeError as exc:
        raise UserError(f"Model {ref!r}: {arch.class_name}({arch.args}) fails: {exc}.") from None
    weights = folder / WEIGHTS_FILE
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise UserError(f"Model {ref!r} has no weights file {weights}.") from None
    except Exception as exc:  # unpickling refused, truncated file, shape mismatch
        raise UserError(f"Cannot load the weights of model {ref!r} from {weights}: "
                        f"{load_failure(exc)}") from None
    return model.to(device).eval()


# torch's advice on a refused file: load it unsafely (weights_only=False, safe_globals), which
# is what a tampered store wants; nf1prov never repeats it.
UNSAFE_ADVICE = re.compile(r"weights_only|safe_globals|trusted source|trust this|"
                           r"documentation of torch\.load|two options", re.IGNORECASE)
FORBIDDEN_GLOBAL = re.compile(r"(?:unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)",
                              re.IGNORECASE)


def load_failure(exc: Exception) -> str:
    """Why torch could not read a weights (or checkpoint) file, in one line, without torch's
    advice to load the file unsafely."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError):
        found = FORBIDDEN_GLOBAL.search(str(exc))
        asks = f" (it asks to import {found[1]})" if found else ""
        return (f"the file is not tensors only{asks}, and nf1prov reads tensors only, never "
                "running code from a file: it was not written by nf1prov, or it was changed "
                "since.")
    sentences = re.split(r"(?<=[.!?])\s+", " ".join(str(exc).split()))
    kept = [s for s in sentences if s and not UNSAFE_ADVICE.search(s)]
    return " ".join(kept) or type(exc).__name__


def installed_module(arch: Architecture):
    """The installed module ``arch`` names when its source file is the recorded blob, else
    None."""
    try:
        module = importlib.import_module(arch.module)
        installed = Path(inspect.getsourcefile(module))
        if blob_hash(installed.read_bytes()) == arch.source_blob:
            return module
    except (ImportError, TypeError, OSError):
        pass  # not installed here
    return None


def source_text(arch: Architecture, *, repo: Path | None, codename: str | None,
                source: Path | None = None) -> str | None:
    """The source the model was trained with: the installed module's, else ``source`` (a copy
    shipped with the model), else the git repository's (`_source_from_git`); each only when its
    bytes hash to the recorded blob. None when none has it."""
    module = installed_module(arch)
    if module is not None:
        return Path(inspect.getsourcefile(module)).read_bytes().decode("utf-8")
    shipped = _source_from_file(arch, source)
    return shipped if shipped is not None else _source_from_git(arch, repo, codename)


def architecture_class(arch: Architecture, *, ref: str, repo: Path | None,
                       codename: str | None, source: Path | None = None) -> type:
    """The class ``arch`` names, defined by exactly the source it was trained with
    (`source_text`)."""
    module = installed_module(arch)
    if module is not None:
        return _class_from(module, arch, ref)
    source = _source_from_file(arch, source) or _source_from_git(arch, repo, codename)
    if source is None:
        where = f"the git repository {repo}" if repo else "a git repository (none here)"
        fetch = (f"`git fetch origin tag model/{codename}`" if codename
                 else "`git fetch --all --tags`")
        raise UserError(
            f"Model {ref!r} was trained with a version of {arch.source_path} (git blob "
            f"{arch.source_blob[:12]}) that is neither the installed one nor in {where}. Run "
            f"from a clone of the project that holds the model's commit ({fetch}, or "
            f"`nf1prov checkout {codename or 'CODENAME'}`).")
    name = f"nf1prov_architecture_{arch.source_blob[:16]}"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__file__ = f"{arch.source_path}@{arch.source_blob[:12]}"
        sys.modules[name] = module  # dataclasses and pickling look classes up here
        try:
            exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
        except Exception as exc:
            del sys.modules[name]
            raise UserError(f"Model {ref!r}: its {arch.source_path} (blob "
                            f"{arch.source_blob[:12]}) fails to import: {exc}") from None
    return _class_from(module, arch, ref)


def _class_from(module, arch: Architecture, ref: str) -> type:
    cls = getattr(module, arch.class_name, None)
    if not isinstance(cls, type):
        raise UserError(f"Model {ref!r}: {arch.source_path} defines no class "
                        f"{arch.class_name}.")
    return cls


def _source_from_file(arch: Architecture, path: Path | None) -> str | None:
    try:
        data = Path(path).read_bytes() if path is not None else None
    except OSError:
        return None
    return data.decode("utf-8") if data is not None and blob_hash(data) == arch.source_blob \
        else None


def _source_from_git(arch: Architecture, repo: Path | None, codename: str | None) -> str | None:
    if repo is None:
        return None
    from nf1prov import git

    tagged = codename and git.CODENAME_RE.match(codename)

    def read() -> str | None:
        # By the recorded blob name (a SHA-1 repository), else as the file in the model's
        # commit (a SHA-256 repository names the same bytes otherwise); the bytes must hash to
        # the recorded blob either way.
        specs = [arch.source_blob] + ([f"{git.model_tag(codename)}:{arch.source_path}"]
                                      if tagged else [])
        for spec in specs:
            proc = git.git("cat-file", "blob", spec, cwd=repo, check=False, text=False)
            if proc.returncode == 0 and blob_hash(proc.stdout) == arch.source_blob:
                return proc.stdout.decode("utf-8")
        return None

    source = read()
    if source is None and tagged and git.fetch_model_tag(repo, codename):
        source = read()
    return source
