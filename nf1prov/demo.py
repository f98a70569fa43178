"""`nf1prov demo`: the whole loop (data, two trainings, evaluation, catalogue, checkout) in a
throwaway workspace, so a newcomer sees every step and what it produced.

The workspace is a fresh git repository of its own with its own `mlflow.db`. Every step after
the setup runs the real CLI as a subprocess inside it, with MLFLOW_TRACKING_URI pinned to that
file: the user's repository and any shared tracking server they point at are never touched.
A folder is only ever deleted when it carries the marker file the demo itself wrote.
"""

from __future__ import annotations

import difflib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nf1prov.errors import UserError

DEFAULT_PATH = Path("demo-workspace")
MARKER = ".nf1prov-demo"
CONFIG = "configs/demo.toml"
DATA = "data"
GITIGNORE = ["mlflow.db", "mlruns/", "mlartifacts/", ".nf1prov/", "/data/", "/checkouts/",
             "/predictions/",
             "__pycache__/", f"/{MARKER}"]
DEMO_IDENTITY = ("nf1prov demo", "demo@nf1prov.invalid")

# --fast: tiny data and a tiny network, for tests; every step still runs for real.
FAST_DATA = ["--patients", "3", "--sites", "2", "--slices", "5", "--height", "48",
             "--width", "48"]
FAST_TRAIN = ["train.epochs=1", "model.base_width=4", "data.crop_size=32",
              "data.crop_stride=16", "train.max_batches_per_epoch=2", "train.weight_samples=4",
              "train.overlay_crops=1", 'description.architecture="UNet (width 4)"']

# The one config value changed between the two models (a visible one-line diff).
CHANGED_KEY = "learning_rate"
LEARNING_RATE_LINE = re.compile(rf"^({CHANGED_KEY}\s*=\s*)(\S+)(.*)$", re.MULTILINE)
STEPS = 9
STDERR_TAIL = 15

Echo = Callable[[str], None]

README = """# nf1prov demo workspace

This folder is a throwaway git repository made by `nf1prov demo`: synthetic data in `data/`,
two models trained with `nf1prov train` (one commit and one MLflow run each, stored in
`mlflow.db`), the catalogue below rebuilt by `nf1prov catalog`, and the first model checked out
into `checkouts/`. Delete the folder when done, or start over with `nf1prov demo --replace`.

## Model Descriptions
{begin}
{end}
"""

MARKER_TEXT = ("This folder was created by `nf1prov demo`. `nf1prov demo --replace` deletes and "
               "recreates it; without this file the demo never deletes the folder.\n")


@dataclass(frozen=True)
class Model:
    codename: str
    sha: str


@dataclass(frozen=True)
class DemoResult:
    workspace: Path
    models: tuple[Model, Model]
    seconds: float


# --- workspace ---------------------------------------------------------------------------------


def _protected_folders() -> list[Path]:
    """The folders a workspace may neither be nor contain: the current directory and the git
    repository around it (--replace would otherwise delete the user's own work)."""
    from nf1prov import git

    folders = [Path.cwd().resolve()]
    try:
        folders.append(git.repo_root(".").resolve())
    except UserError:
        pass
    return folders


def check_target(workspace: Path, replace: bool) -> bool:
    """Refuse every workspace path that could hold the user's files; returns True when an
    earlier demo workspace is there to be replaced. Nothing is changed here."""
    if workspace.is_symlink():
        raise UserError(f"{workspace} is a symbolic link: pass a real folder path for the demo "
                        "workspace.")
    resolved = workspace.resolve()
    for folder in _protected_folders():
        if resolved == folder or resolved in folder.parents:
            raise UserError(
                f"{workspace} is, or contains, your current folder or repository {folder}: the "
                "demo needs a throwaway folder of its own and never touches your files. Pass a "
                "new path, e.g. `nf1prov demo demo-workspace`.")
    if not workspace.exists():
        return False
    if not workspace.is_dir():
        raise UserError(f"{workspace} exists and is not a folder: pass a new path for the demo "
                        "workspace.")
    if not any(workspace.iterdir()):
        return False
    if not (workspace / MARKER).is_file():
        raise UserError(
            f"{workspace} exists, is not empty and was not made by `nf1prov demo` (no {MARKER} "
            "file in it), so the demo will not use or delete it, even with --replace. Pass a new "
            "or empty folder, e.g. `nf1prov demo demo-workspace`.")
    if not replace:
        raise UserError(
            f"{workspace} holds an earlier demo workspace. Run `nf1prov demo {workspace} "
            "--replace` to delete it and start over, or pass another path.")
    return True


def _copy_tree(source: Path, destination: Path, *skip: str) -> None:
    shutil.copytree(source, destination,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", *skip))


def prepare_workspace(path: Path | str, replace: bool = False, echo: Echo = print) -> Path:
    """Create the workspace: a new git repository (branch main) holding copies of nf1prov/,
    models/, templates/ and configs/ (a model commit holds the code that trains it), a README
    with empty catalogue markers, a .gitignore and the marker file, committed as "Demo
    workspace". Returns its absolute path.

    An existing folder is used only when empty, or replaced (deleted) only when it carries the
    marker and ``replace`` is set; see `check_target`.
    """
    import models
    import nf1prov
    from nf1prov import catalog, git
    from nf1prov.resources import shipped_dir

    workspace = Path(path).absolute()
    if check_target(workspace, replace):
        shutil.rmtree(workspace)
        echo(f"  -> removed the earlier demo workspace {workspace}")
    workspace.mkdir(parents=True, exist_ok=True)
    (workspace / MARKER).write_text(MARKER_TEXT, encoding="utf-8")
    git.git("init", "--quiet", "--initial-branch=main", cwd=workspace)
    _copy_tree(Path(models.__file__).resolve().parent, workspace / "models")
    # A wheel carries templates/ and configs/ inside the package: the workspace has its own.
    _copy_tree(Path(nf1prov.__file__).resolve().parent, workspace / "nf1prov", "templates",
               "configs")
    for name in ("templates", "configs"):
        _copy_tree(shipped_dir(name), workspace / name)
    (workspace / ".gitignore").write_text("\n".join(GITIGNORE) + "\n", encoding="utf-8")
    (workspace / "README.md").write_text(
        README.format(begin=catalog.BEGIN_MARKER, end=catalog.END_MARKER), encoding="utf-8")
    if git.identity(workspace) is None:
        git.git("config", "user.name", DEMO_IDENTITY[0], cwd=workspace)
        git.git("config", "user.email", DEMO_IDENTITY[1], cwd=workspace)
        echo(f"  -> no git identity configured: set '{DEMO_IDENTITY[0]} <{DEMO_IDENTITY[1]}>' in "
             "the workspace's own .git/config (your settings are untouched)")
    git.stage_all(workspace)
    sha = git.commit(workspace, "Demo workspace\n")
    left = [path for _, path in git.status_porcelain(workspace)]
    if left:  # e.g. a git hook that rewrote files: the first model commit would sweep them in
        raise UserError(f"Setting up the demo workspace {workspace} left uncommitted changes "
                        f"({', '.join(left[:5])}); check your git hooks and config, then run "
                        "again with --replace.")
    echo(f"  -> {workspace}: git repository, commit {sha[:10]} 'Demo workspace' with models/, "
         "nf1prov/, templates/, configs/, README.md, .gitignore")
    return workspace


def outer_repository_note(workspace: Path) -> str | None:
    """A note when the workspace lies inside another repository that does not ignore it: the
    demo changes nothing there, but `git status` in it will list the new folder."""
    from nf1prov import git

    folder = workspace.parent
    while not folder.is_dir():
        folder = folder.parent
    try:
        outer = git.repo_root(folder)
    except UserError:
        return None
    if git.is_ignored(outer, workspace, directory=True):
        return None
    relative = workspace.resolve().relative_to(outer.resolve()).as_posix()
    return (f"note: {workspace} lies inside the repository {outer}, which does not ignore it: "
            f"`git status` there will list {relative}/ as untracked (add it to that "
            ".gitignore, or delete the folder when done)")


# --- running one step ----------------------------------------------------------------------------


def step_env(workspace: Path) -> dict[str, str]:
    """The environment of every step: the workspace's own sqlite store, whatever the user's
    shell points at, and no run or experiment inherited from an outer `mlflow run`."""
    from nf1prov import tracking

    env = tracking.child_environment(tracking.default_tracking_uri(workspace))
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    env["PYTHONUNBUFFERED"] = "1"  # stream the step's output line by line
    return env


def _tail(text: str, lines: int = STDERR_TAIL) -> list[str]:
    """The last non-empty lines of a step's stderr; progress bars redraw with carriage returns,
    so only the last state of each line is kept."""
    kept = [line.rsplit("\r", 1)[-1].rstrip() for line in text.splitlines()]
    return [line for line in kept if line][-lines:]


class StderrPump(threading.Thread):
    """Reads a step's stderr as it comes: keeps the last bytes for an error message and, on a
    terminal, passes it through so the step's progress bars and warnings stay visible."""

    KEEP = 64 * 1024

    def __init__(self, stream, relay: bool):
        super().__init__(daemon=True)
        self.stream = stream
        self.relay = relay
        self.kept = bytearray()

    def run(self) -> None:
        for chunk in iter(lambda: os.read(self.stream.fileno(), 4096), b""):
            self.kept = (self.kept + chunk)[-self.KEEP:]
            if self.relay:
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()

    def text(self) -> str:
        return self.kept.decode("utf-8", errors="replace")


class Steps:
    """Numbers the steps, prints their headers and runs their commands in the workspace."""

    def __init__(self, workspace: Path, echo: Echo, total: int = STEPS,
                 show_progress: bool | None = None):
        self.workspace = workspace
        self.echo = echo
        self.total = total
        self.number = 0
        self.title = ""
        self.show_progress = sys.stderr.isatty() if show_progress is None else show_progress

    def header(self, title: str, command: list[str] | None = None) -> None:
        self.number += 1
        self.title = title
        shown = f": {shlex.join(['nf1prov', *command])}" if command else ""
        self.echo(f"\n[{self.number}/{self.total}] {title}{shown}")

    def fail(self, problem: str, details: str = "") -> UserError:
        """The error for a failed step: which step, what went wrong, what to do; ``details``
        (the step's own error output) goes last."""
        again = shlex.join(["nf1prov", "demo", str(self.workspace), "--replace"])
        return UserError(f"Demo step {self.number}/{self.total} ({self.title}) {problem}. The "
                         f"workspace {self.workspace} is left as it is for inspection; start "
                         f"over with `{again}`.{details}")

    def run(self, title: str, args: list[str], echo_output: bool = True) -> str:
        """Run `nf1prov <args>` in the workspace, echoing its output indented (unless not
        ``echo_output``); returns stdout.

        A non-zero exit raises UserError with the command, its exit code and its last stderr
        lines.
        """
        self.header(title, args)
        command = [sys.executable, "-m", "nf1prov", *args]
        lines: list[str] = []
        with subprocess.Popen(command, cwd=self.workspace, env=step_env(self.workspace),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            pump = StderrPump(proc.stderr, relay=self.show_progress)
            pump.start()
            for line in io.TextIOWrapper(proc.stdout, encoding="utf-8", errors="replace"):
                lines.append(line)
                if echo_output:
                    self.echo("    " + line.rstrip("\n"))
            proc.wait()
            pump.join()
        if proc.returncode != 0:
            tail = "\n".join("    " + line for line in _tail(pump.text())) or "    (none)"
            raise self.fail(f"failed with exit code {proc.returncode}: "
                            f"`{shlex.join(['nf1prov', *args])}` in {self.workspace}",
                            f"\nLast lines of its error output:\n{tail}")
        return "".join(lines)

    def produced(self, text: str) -> None:
        self.echo(f"  -> {text}")


# --- the steps -----------------------------------------------------------------------------------


def _train(steps: Steps, title: str, fast: bool) -> Model:
    """Train one model with the workspace's demo config; its codename and commit come from
    `nf1prov train --json`."""
    from nf1prov import git

    args = ["train", "--config", CONFIG, "--data-root", DATA, "--json"]
    for item in FAST_TRAIN if fast else []:
        args += ["--set", item]
    out = steps.run(title, args, echo_output=False)
    try:
        record = json.loads(out)
        model = Model(record["codename"], record["commit"])
    except (ValueError, KeyError, TypeError):
        raise steps.fail("printed no JSON outcome with a codename and a commit: "
                         f"{out[-300:]!r}") from None
    dice = ", ".join(f"{name} {value:.3f}" for name, value in record["best_val_dice"].items()
                     if name != "background")
    steps.echo(f"    codename {model.codename}, run {record['run_id']}; best epoch "
               f"{record['best_epoch']} of {record['epochs_run']}, val Dice {dice}")
    from nf1prov.train.health import warning_lines

    for line in warning_lines(record.get("health")):  # what `train` printed last, hidden here
        steps.echo(f"    {line}")
    parent = git.git("rev-parse", f"{model.sha}^", cwd=steps.workspace).stdout.strip()
    changed = [line.replace("\t", " ") for line in
               git.changed_files(steps.workspace, parent, model.sha)]
    steps.produced(f"model {model.codename}: commit {model.sha[:10]} tagged "
                   f"model/{model.codename}, files committed: "
                   f"{', '.join(changed) or 'none (code unchanged)'}")
    return model


def change_config(steps: Steps) -> tuple[str, str]:
    """Edit the workspace's demo config by hand, as a user would between two trainings; the
    edit becomes part of the next model's commit. Returns (old line, new line)."""
    path = steps.workspace / CONFIG
    steps.header(f"Change {CHANGED_KEY} in {CONFIG} (the edit goes into model 2's commit)")
    text = path.read_text(encoding="utf-8")
    match = LEARNING_RATE_LINE.search(text)
    if match is None:
        raise steps.fail(f"found no '{CHANGED_KEY} = ...' line in {path}")
    new_value = "3e-4" if float(match.group(2)) == 1e-3 else "1e-3"
    new_text = text[:match.start(2)] + new_value + text[match.end(2):]
    path.write_text(new_text, encoding="utf-8")
    diff = [line for line in difflib.unified_diff(text.splitlines(), new_text.splitlines(),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and line[:3] not in ("+++", "---")]
    for line in diff:
        steps.echo(f"    {line}")
    steps.produced(f"{CONFIG} modified (uncommitted until the next training)")
    return match.group(0), LEARNING_RATE_LINE.search(new_text).group(0)


def _catalogue(steps: Steps) -> None:
    from nf1prov import catalog

    steps.run("Rebuild the README model catalogue", ["catalog"])
    text = (steps.workspace / "README.md").read_text(encoding="utf-8")
    block = text[text.index(catalog.BEGIN_MARKER):text.index(catalog.END_MARKER)]
    entries = block.count("**Codename:**")
    steps.produced(f"README.md now lists {entries} models; its catalogue begins:")
    shown = [line for line in block.splitlines()[1:] if line.strip()][:8]
    for line in shown:
        steps.echo(f"    | {line}")


def _checkout(steps: Steps, model: Model, old_line: str) -> Path:
    """Check model 1 out into a worktree and show it holds model 1's code, config and weights."""
    from nf1prov import git
    from nf1prov.provenance.checkout import MODELS_DIR

    relative = Path("checkouts") / model.codename
    steps.run("Check model 1 out into a worktree",
              ["checkout", model.codename, "--worktree", str(relative)])
    tree = steps.workspace / relative
    head = git.head_sha(tree)
    if head != model.sha:
        raise steps.fail(f"left {tree} at {head}, not model 1's commit {model.sha}")
    weights = tree / MODELS_DIR / model.codename / "model"
    if not weights.is_dir():
        raise steps.fail(f"downloaded no weights to {weights}")
    config_lines = (tree / CONFIG).read_text(encoding="utf-8").splitlines()
    if old_line not in config_lines:
        raise steps.fail(f"checked out a {CONFIG} without model 1's line {old_line!r}")
    steps.produced(f"{relative}: HEAD {head[:10]} = model 1's commit")
    steps.produced(f"weights in {weights.relative_to(steps.workspace)}/")
    steps.produced(f"its {CONFIG} still says `{old_line}` (model 1's value)")
    return tree


def run_demo(path: Path | str = DEFAULT_PATH, fast: bool = False, replace: bool = False,
             echo: Echo = print) -> DemoResult:
    """Run the whole demo; see the module docstring. Raises UserError when a step fails."""
    start = time.monotonic()
    workspace = Path(path).absolute()
    check_target(workspace, replace)  # refuse before printing anything
    steps = Steps(workspace, echo)
    steps.header(f"Create the demo workspace {workspace}")
    note = outer_repository_note(workspace)
    prepare_workspace(workspace, replace, echo)
    if note:
        steps.produced(note)
    steps.run("Generate synthetic data", ["demo-data", DATA, *(FAST_DATA if fast else [])])
    first = _train(steps, "Train model 1", fast)
    old_line, new_line = change_config(steps)
    second = _train(steps, f"Train model 2 (with `{new_line}`)", fast)
    steps.run("List the models", ["list"])
    # Evaluate before the catalogue, so that model 1's entry shows its holdout scores.
    steps.run("Evaluate model 1 on the held-out patient against the classical baseline",
              ["evaluate", first.codename, "--data-root", DATA, "--baseline"])
    _catalogue(steps)
    _checkout(steps, first, old_line)
    result = DemoResult(workspace, (first, second), time.monotonic() - start)
    for line in summary(result, old_line, new_line):
        echo(line)
    return result


def summary(result: DemoResult, old_line: str, new_line: str) -> list[str]:
    from nf1prov import tracking

    first, second = result.models
    uri = tracking.default_tracking_uri(result.workspace)
    commands = [
        (f"cd {shlex.quote(str(result.workspace))}", ""),
        (f"nf1prov show {second.codename}", "tags, metrics, files changed since model 1"),
        (f"git show model/{second.codename} --stat", "model 2's commit"),
        (f"nf1prov reproduce {first.codename} --data-root {DATA}",
         "retrain model 1 from its commit; metrics must match"),
        (f"nf1prov predict {first.codename} {DATA}/NF0014_T1 -o predictions/", ""),
        (f"mlflow ui --backend-store-uri {uri}", ""),
    ]
    width = max(len(command) for command, _ in commands)
    lines = [
        "",
        f"Demo finished in {result.seconds:.0f} s. Workspace: {result.workspace}",
        f"  model 1: {first.codename}  commit {first.sha}  ({old_line})",
        f"  model 2: {second.codename}  commit {second.sha}  ({new_line})",
        "",
        "Next commands to try:",
    ]
    lines += [f"  {command:<{width}}  # {comment}" if comment else f"  {command}"
              for command, comment in commands]
    if os.environ.get("MLFLOW_TRACKING_URI"):
        lines.append("  (your shell sets MLFLOW_TRACKING_URI: there, first run "
                     f"`export MLFLOW_TRACKING_URI={uri}` or pass --tracking-uri)")
    return lines
