"""The README model catalogue (DESIGN 3.4): MLflow model runs -> Markdown through Jinja templates.

Flow: `model_runs` (one query, newest first) -> `build_context` (plain dicts, values still raw
user text) -> `render` (Jinja, every ``{{ value }}`` escaped for Markdown by the environment's
``finalize``) -> `splice` between the markers -> `write_atomic`.

Only committed models are listed (a run without `mlflow.source.git.commit` never got its commit),
and rendering reads nothing but the runs: not the host, its processes or its clock, so the same
store gives the same bytes on any machine at any time (DESIGN 3.4).

A marker counts only as a line of its own outside fenced code (`find_markers`), so a README may
quote the markers in prose or in a code block.

`import_history` backfills the nf1prov tags on runs trained before nf1prov, from the upstream
commit subjects (`Model run codename: X Run ID: Y Experiment ID: Z` and older forms).
"""

from __future__ import annotations

import ast
import datetime as dt
import difflib
import json
import math
import os
import re
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from nf1prov import tracking
from nf1prov.errors import UserError
from nf1prov.resources import shipped_dir

BEGIN_MARKER = "<!-- nf1prov:catalog:begin -->"
END_MARKER = "<!-- nf1prov:catalog:end -->"
HEADING = "## Model Descriptions"
COMMIT_SUBJECT = "Update model catalogue"
TEMPLATE_NAME = "catalog.md.j2"
PACKAGED_TEMPLATES = shipped_dir("templates")

# (field, label) in upstream order; `summary` is ours and goes first when present.
FIELDS = (
    ("summary", "Summary"),
    ("architecture", "Architecture"),
    ("task", "Task"),
    ("qc", "QC / Filtering"),
    ("data", "Data"),
    ("preprocessing", "Preprocessing"),
    ("loss", "Loss"),
)
CLASSES = ("background", "inner-cell", "cell-boundary")
SPLITS = ("train", "val", "test")
HOLDOUT_PARAM = "data.holdout_patients"
DATA_ROOT_PARAM = "data.root"
EPOCHS_RUN_METRIC = "epochs_run"
BEST_EPOCH_METRIC = "best_epoch"


# --- Markdown escaping ------------------------------------------------------------------------

_LINE_BREAKS = re.compile(r"[\r\n\v\f\x85\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f]")
_INLINE = re.compile(
    r"[\\`*~\[\]|$<>]"  # code, emphasis, strike, links, tables, math, HTML
    r"|&(?=#?\w+;)"  # only an & that would start an entity
    r"|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])"  # _ that could open or close emphasis
)
_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def escape_md(value: object) -> str:
    """``value`` as one line of Markdown text that renders as itself and nothing more.

    Line breaks become spaces (a value cannot start a new block), HTML and the characters that
    open Markdown constructs are escaped, and a leading list/heading marker is neutralised, so
    the text is safe as a list item, inside a blockquote or after a bold label.
    """
    text = _CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value))).replace("\t", " ")
    if text.strip():  # leading spaces could make an indented code block: drop them
        text = text.strip()
    text = _INLINE.sub(lambda m: _HTML.get(m.group(0), "\\" + m.group(0)), text)
    text = re.sub(r"^([-+#=])", r"\\\1", text)  # list item, heading, thematic/setext line
    return re.sub(r"^(\d{1,9})([.)])", r"\1\\\2", text)  # "1. text" is an ordered list


def code_span(value: object) -> str:
    """``value`` as an inline code span (fence longer than any backtick run inside)."""
    text = _CONTROL.sub("", _LINE_BREAKS.sub(" ", str(value)))
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def link_url(url: str) -> str:
    """A URL usable inside ``[text](...)``: spaces, parentheses and angle brackets encoded."""
    return "".join({" ": "%20", "(": "%28", ")": "%29", "<": "%3C", ">": "%3E"}.get(c, c)
                   for c in _LINE_BREAKS.sub("", url))


# --- Jinja ------------------------------------------------------------------------------------

def _environment(template_dirs: list[Path]):
    import jinja2
    from markupsafe import Markup

    def finalize(value):
        # Every {{ value }} is escaped for Markdown unless a filter already made it Markup.
        return value if isinstance(value, Markup) else Markup(escape_md(value))

    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(d)) for d in template_dirs]),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["code"] = lambda v: Markup(code_span(v))
    env.filters["md"] = lambda v: Markup(escape_md(v))
    env.filters["link"] = lambda text, url: Markup(f"[{escape_md(text)}]({link_url(url)})")
    env.filters["raw"] = Markup  # explicit opt-out for template authors
    env.filters["scores"] = lambda items: ", ".join(f"{s['name']} {s['value']}" for s in items)
    env.filters["items"] = lambda values: Markup(", ".join(escape_md(v) for v in values))
    return env


def template_dirs(repo_root: Path | None, template_dir: Path | None) -> list[Path]:
    """Where templates are looked up, first match wins; the packaged copy always comes last.

    ``--template DIR`` replaces the repository's ``templates/`` folder; a file missing there
    (e.g. only the per-model partial was customised) falls back to the packaged one.
    """
    if template_dir is not None:
        template_dir = Path(template_dir)
        if not template_dir.is_dir():
            raise UserError(f"--template {template_dir}: no such directory. Pass the folder "
                            f"that holds {TEMPLATE_NAME} (copy nf1prov/templates/ to start).")
        return [template_dir, PACKAGED_TEMPLATES]
    dirs = []
    if repo_root is not None and (Path(repo_root) / "templates").is_dir():
        dirs.append(Path(repo_root) / "templates")
    return [*dirs, PACKAGED_TEMPLATES]


def _template_frame(exc: BaseException) -> str:
    """'<file> line <n>' of the innermost template frame in ``exc``'s traceback."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.endswith(".j2")]
    if not frames:
        return getattr(exc, "filename", None) or TEMPLATE_NAME
    return f"{frames[-1].filename} line {frames[-1].lineno}"


def render(context: dict, dirs: list[Path]) -> str:
    """The catalogue block (LF line endings, exactly one trailing newline)."""
    env = _environment(dirs)
    try:
        text = env.get_template(TEMPLATE_NAME).render(**context)
    except Exception as exc:  # a user-edited template can fail in any way: name where
        raise UserError(
            f"The catalogue template {_template_frame(exc)} failed: {exc}. Fix the template "
            f"(looked up in: {', '.join(map(str, dirs))})."
        ) from exc
    text = text.replace("\r\n", "\n").rstrip("\n") + "\n"
    check_block(text, dirs)
    return text


def render_entry(run, tracking_uri: str | None, dirs: list[Path]) -> tuple[str, dict]:
    """One model's catalogue entry alone (e.g. for an exported package's README): (Markdown,
    the ``entry`` the template got)."""
    entry = build_context([run], tracking_uri)["groups"][0]["entries"][0]
    return _environment(dirs).get_template("catalog_entry.md.j2").render(entry=entry), entry


def check_block(block: str, dirs: list[Path]) -> None:
    """Refuse rendered text that would break the README's markers: a marker line of its own
    outside fenced code, or a code fence left open (it would hide the end marker)."""
    prose, open_fence = prose_lines(block)
    markers = [line.number for line in prose if marker_kind(line.content)]
    where = f"(looked up in: {', '.join(map(str, dirs))})"
    if markers:
        raise UserError(
            f"The catalogue template output has a line holding only {BEGIN_MARKER!r} or "
            f"{END_MARKER!r} (output line {markers[0]}): remove the marker from the template, "
            f"or quote it inside text or a code block {where}.")
    if open_fence:
        raise UserError(
            f"The catalogue template output leaves a {open_fence} code fence open: close it in "
            f"the template, or the README's end marker would be read as code {where}.")


# --- runs -> template context -----------------------------------------------------------------

def parse_items(value: str) -> str | list[dict]:
    """A description tag value: the string itself, or the nested items of its JSON array.

    ``["a", "b", ["b1", ["b1x"]], "c"]`` -> ``[{a}, {b: [b1: [b1x]]}, {c}]``: an array holds the
    sub-items of the item before it (DESIGN 3.3).
    """
    if not value.lstrip().startswith("["):
        return value
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return _tree(parsed) if isinstance(parsed, list) else value


def _tree(items: list) -> list[dict]:
    nodes: list[dict] = []
    for item in items:
        if isinstance(item, list):
            if nodes:
                nodes[-1]["children"].extend(_tree(item))
            else:  # no item to hang them on: keep them at this level
                nodes.extend(_tree(item))
        else:
            nodes.append({"text": "" if item is None else str(item), "children": []})
    return nodes


def flatten(nodes: list[dict], depth: int = 0) -> list[dict]:
    """Nested items as lines: ``[{"depth": 0, "indent": "", "text": ...}, ...]``."""
    lines = []
    for node in nodes:
        lines.append({"depth": depth, "indent": "  " * depth, "text": node["text"]})
        lines.extend(flatten(node["children"], depth + 1))
    return lines


def description(tags: dict) -> list[dict]:
    """The description fields of a run, known ones in upstream order, then any others by name."""
    known = dict(FIELDS)
    names = [f for f, _ in FIELDS] + sorted(
        t[len(tracking.DESCRIPTION_PREFIX):] for t in tags
        if t.startswith(tracking.DESCRIPTION_PREFIX)
        and t[len(tracking.DESCRIPTION_PREFIX):] not in known
    )
    fields = []
    for name in names:
        value = tags.get(tracking.DESCRIPTION_PREFIX + name)
        if value is None or not value.strip():
            continue
        parsed = parse_items(value)
        label = known.get(name) or name.replace("_", " ").capitalize()
        if isinstance(parsed, str):
            fields.append({"name": name, "label": label, "text": parsed, "bullets": []})
        else:
            fields.append({"name": name, "label": label, "text": None, "bullets": flatten(parsed)})
    return fields


def notes(tags: dict) -> list[str]:
    raw = tags.get(tracking.NOTES)
    if not raw:
        return []
    try:
        parsed = json.loads(raw)
    except ValueError:
        return [raw]
    if isinstance(parsed, list):
        return [str(n) for n in parsed if str(n).strip()]
    return [str(parsed)]


def warning(run) -> str | None:
    """The `Important!!!` line of a run that did not finish cleanly, else None.

    Only the status recorded in the store counts (never the process table, hostname or clock):
    a run whose process died stays "still training" until `nf1prov list --reap` records it
    FAILED, and then every machine renders the same text.
    """
    status = run.info.status
    failure = run.data.tags.get(tracking.FAILURE)
    if status in ("FAILED", "KILLED"):
        verb = "failed" if status == "FAILED" else "was killed"
        return f"This run {verb}: {failure}" if failure else f"This run {verb} (no reason recorded)"
    if status in ("RUNNING", "SCHEDULED"):
        return "This model is still training: its figures are not final"
    return None


def holdout_patients(params: dict) -> str | None:
    raw = params.get(HOLDOUT_PARAM)
    if raw is None:
        return None
    value: object = raw
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(raw)
            break
        except (ValueError, SyntaxError, TypeError):
            continue
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value) or "none"
    return str(value) or "none"


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def scores(metrics: dict, prefix: str) -> list[dict]:
    """``[{"name": "background", "value": "0.981"}, ...]`` for metrics ``<prefix>_<class>``."""
    return [{"name": c, "value": _fmt(metrics[f"{prefix}_{c}"])}
            for c in CLASSES if f"{prefix}_{c}" in metrics]


def ui_base(tracking_uri: str | None) -> str | None:
    """The MLflow UI address for an http(s) tracking server (credentials removed), else None."""
    if not tracking_uri or not tracking_uri.startswith(("http://", "https://")):
        return None
    parts = urlsplit(tracking_uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _whole(value: float | None) -> int | None:
    """A metric that counts something (an epoch), as an int; None when absent or not finite."""
    return int(value) if value is not None and math.isfinite(value) else None


def data_splits(run) -> list[dict]:
    """``[{"name": "train", "fields": 4, "patients": ["NF0016", ...], "patient_count": 2}, ...]``
    in split order, from the `nf1prov.data.splits` tag the trainer records; for older runs the
    `dataset.<split>_fields` params (counts only, ``patients`` empty, ``patient_count`` None)."""
    raw = run.data.tags.get(tracking.DATA_SPLITS)
    try:
        recorded = json.loads(raw) if raw else {}
    except ValueError:
        recorded = {}
    if not isinstance(recorded, dict):
        recorded = {}
    out = []
    for name in (*SPLITS, *sorted(set(recorded) - set(SPLITS))):
        split = recorded.get(name)
        if isinstance(split, dict) and isinstance(split.get("fields"), int):
            patients = split.get("patients")
            patients = [str(p) for p in patients] if isinstance(patients, list) else []
            count = split.get("patient_count", len(patients) if patients else None)
            out.append({"name": name, "fields": split["fields"], "patients": patients,
                        "patient_count": count if isinstance(count, int) else None})
            continue
        counted = run.data.params.get(f"dataset.{name}_fields", "")
        if not recorded and counted.isdigit():
            out.append({"name": name, "fields": int(counted), "patients": [],
                        "patient_count": None})
    return out


def entry(run, ui: str | None) -> dict:
    info, tags, metrics = run.info, run.data.tags, run.data.metrics
    start = info.start_time
    date = (dt.datetime.fromtimestamp(start / 1000, dt.UTC).strftime("%Y-%m-%d")
            if start else None)
    return {
        "run_id": info.run_id,
        "experiment_id": info.experiment_id,
        "commit": tags.get(tracking.GIT_COMMIT),
        "codename": tags.get(tracking.CODENAME) or info.run_name or tags.get(tracking.RUN_NAME)
        or info.run_id,
        "date": date,
        "status": info.status,
        "important": warning(run),
        "notes": notes(tags),
        "fields": description(tags),
        "data_root": run.data.params.get(DATA_ROOT_PARAM) or None,
        "splits": data_splits(run),
        "epochs_run": _whole(metrics.get(EPOCHS_RUN_METRIC)),
        "best_epoch": _whole(metrics.get(BEST_EPOCH_METRIC)),
        "holdout_patients": holdout_patients(run.data.params),
        "val_dice": scores(run.data.metrics, "best_val_dice"),
        "holdout_dice": scores(run.data.metrics, "holdout_dice"),
        "holdout_iou": scores(run.data.metrics, "holdout_iou"),
        "reproduced": tags.get(tracking.REPRODUCED),
        "url": f"{ui}/#/experiments/{info.experiment_id}/runs/{info.run_id}" if ui else None,
    }


def newest_first(runs: list) -> list:
    return sorted(runs, key=lambda r: (-(r.info.start_time or 0), r.info.run_id))


def is_committed(run) -> bool:
    """True for a model: its run got its commit (`mlflow.source.git.commit`). A run whose commit
    never happened (a pre-commit hook refused it, it was interrupted waiting for the commit
    lock) is not a model; `--import-history` gives pre-nf1prov runs their commit tag."""
    return bool((run.data.tags.get(tracking.GIT_COMMIT) or "").strip())


def build_context(runs: list, tracking_uri: str | None = None,
                  registered: dict[str, list[str]] | None = None) -> dict:
    """Template context: ``groups`` (one per experiment, newest first) of ``entries``, and
    ``model_count``; runs that never got their commit are left out. ``registered``: what each
    run is registered as (`nf1prov.share.registry.labels_by_run`), as ``entry.registered``."""
    ui = ui_base(tracking_uri)
    models = [run for run in newest_first(runs) if is_committed(run)]
    groups: dict[str, dict] = {}
    for run in models:
        exp = run.info.experiment_id
        groups.setdefault(exp, {"experiment_id": exp, "entries": []})
        groups[exp]["entries"].append(entry(run, ui) | {
            "registered": (registered or {}).get(run.info.run_id, [])})
    return {"groups": list(groups.values()), "model_count": len(models)}


def fetch_runs(client) -> list:
    """Every model run in the store, all experiments, in one query."""
    return newest_first(tracking.model_runs(client))


# --- README splicing --------------------------------------------------------------------------

_LINE = re.compile(r"[^\r\n]*(?:\r\n|\n|\r)|[^\r\n]+\Z")
_EOL = re.compile(r"\r\n|\n|\r")
# A code fence: 3+ backticks or tildes, then (backticks only) an info string without backticks.
# Any indentation is accepted, so fences inside list items count too.
_FENCE = re.compile(r"[ \t]*(?P<fence>`{3,}|~{3,})(?P<rest>.*)")


@dataclass(frozen=True)
class Line:
    """One line of a README: ``number`` (1-based), ``start``/``end`` offsets in the text
    (``end`` after the line ending), ``content`` without its line ending, and ``eol``."""

    number: int
    start: int
    end: int
    content: str
    eol: str


def split_lines(text: str) -> list[Line]:
    """Every line of ``text`` (CRLF, LF and CR endings; the last line may have none)."""
    lines = []
    for number, match in enumerate(_LINE.finditer(text), start=1):
        raw = match.group(0)
        content = raw.rstrip("\r\n")
        lines.append(Line(number, match.start(), match.end(), content, raw[len(content):]))
    return lines


def prose_lines(text: str) -> tuple[list[Line], str | None]:
    """(the lines outside fenced code, the fence still open at the end or None).

    CommonMark fences: a line opening with 3+ backticks or tildes starts a code block that the
    next line holding only a fence of the same character, at least as long, closes; an
    unclosed fence runs to the end of the text. Fence lines themselves are not prose.
    """
    prose, fence = [], None
    for line in split_lines(text):
        match = _FENCE.fullmatch(line.content)
        if fence is None:
            if match and not (match["fence"][0] == "`" and "`" in match["rest"]):
                fence = match["fence"]
            else:
                prose.append(line)
        elif (match and match["fence"][0] == fence[0] and len(match["fence"]) >= len(fence)
              and not match["rest"].strip()):
            fence = None
    return prose, fence


def marker_kind(content: str) -> str | None:
    """"begin" or "end" when a line (without its ending) is a marker of its own, else None."""
    stripped = content.strip(" \t")
    return {BEGIN_MARKER: "begin", END_MARKER: "end"}.get(stripped)


@dataclass(frozen=True)
class Markers:
    """The two marker lines of a README; the catalogue block is ``text[begin.end:end.start]``."""

    begin: Line
    end: Line

    def block(self, text: str) -> str:
        return text[self.begin.end:self.end.start]


def find_markers(text: str, readme: Path | str = "README.md") -> Markers | None:
    """The begin and end marker lines outside fenced code; None when there are none.

    Raises UserError naming the lines when they are broken (one missing, either one
    duplicated, or end before begin).
    """
    prose, _ = prose_lines(text)
    found: dict[str, list[Line]] = {"begin": [], "end": []}
    for line in prose:
        kind = marker_kind(line.content)
        if kind:
            found[kind].append(line)
    begins, ends = found["begin"], found["end"]
    if not begins and not ends:
        return None
    if len(begins) == len(ends) == 1 and begins[0].number < ends[0].number:
        return Markers(begins[0], ends[0])

    def at(lines: list[Line]) -> str:
        return f" (line {', '.join(str(line.number) for line in lines)})" if lines else ""

    raise UserError(
        f"{readme}: the catalogue markers are broken (found {len(begins)} x {BEGIN_MARKER}"
        f"{at(begins)} and {len(ends)} x {END_MARKER}{at(ends)}; expected one of each, begin "
        "first, each on a line of its own). Markers quoted in text or inside fenced code do "
        "not count: check for a ``` fence left open. Fix or delete them and run "
        "`nf1prov catalog` again."
    )


def line_ending(text: str, markers: Markers | None = None) -> str:
    """The README's line ending: that of the begin marker's line, else the first one found."""
    if markers is not None and markers.begin.eol:
        return markers.begin.eol
    match = _EOL.search(text)
    return match.group(0) if match else "\n"


def splice(text: str, block: str, readme: Path | str = "README.md") -> str:
    """``text`` with ``block`` (LF lines) between the marker lines; all other bytes unchanged.

    Without markers they are added (with the block) right below the first `## Model
    Descriptions` line outside fenced code, else appended with that heading at the end.
    """
    markers = find_markers(text, readme)
    eol = line_ending(text, markers)
    body = block.replace("\n", eol)
    if markers is not None:
        return text[:markers.begin.end] + body + text[markers.end.start:]
    section = f"{BEGIN_MARKER}{eol}{body}{END_MARKER}{eol}"
    prose, _ = prose_lines(text)
    heading = next((line for line in prose
                    if re.fullmatch(rf"{re.escape(HEADING)}[ \t]*", line.content)), None)
    if heading:
        sep = "" if heading.eol else eol
        return text[:heading.end] + sep + section + text[heading.end:]
    if text and not text.endswith(("\n", "\r")):
        text += eol
    return text + (eol if text else "") + HEADING + eol + section


def catalogue_block(text: str, readme: Path | str = "README.md") -> tuple[str, int] | None:
    """(the text between the marker lines, line number of its first line); None without
    markers. Raises UserError for broken markers."""
    markers = find_markers(text, readme)
    if markers is None:
        return None
    return markers.block(text), markers.begin.number + 1


def read_readme(path: Path) -> str:
    if not path.exists():
        return ""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path} is not UTF-8 text ({exc}); convert it to UTF-8 first.") from exc
    except OSError as exc:
        raise UserError(f"Cannot read {path}: {exc}.") from exc


def write_target(path: Path) -> Path:
    """The file a write to ``path`` must replace: the end of its symlink chain (a dangling link
    names the file to create), else ``path`` itself."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file beside the real file and os.replace; keeps the file mode.

    A symlinked README stays a link: the temp file goes in the target's folder and replaces the
    target, so readers see the old or the new text, never a mix.
    """
    path = Path(path)
    target = write_target(path)
    try:
        mode = target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    except OSError as exc:
        raise UserError(f"Cannot write {path}: {exc}. Fix the file (or its symlink).") from exc
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise UserError(f"Cannot write {path} (a temporary file in {target.parent}: {exc}); "
                        "check that the folder exists and is writable.") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def unified_diff(old: str, new: str, name: str) -> str:
    return "".join(difflib.unified_diff(old.splitlines(keepends=True),
                                        new.splitlines(keepends=True),
                                        fromfile=f"a/{name}", tofile=f"b/{name}"))


@dataclass
class Rebuild:
    """A README before and after the catalogue rebuild (nothing written yet)."""

    readme: Path
    old: str
    new: str
    model_count: int

    @property
    def changed(self) -> bool:
        return self.old != self.new

    @property
    def old_block(self) -> tuple[str, int] | None:
        """(the README's catalogue block now, its first line number); None without markers."""
        return catalogue_block(self.old, self.readme)

    @property
    def new_block(self) -> str:
        """The block as written between the markers (the README's line endings)."""
        found = catalogue_block(self.new, self.readme)
        assert found is not None  # splice always leaves markers
        return found[0]


def rebuild(readme: Path, runs: list, *, tracking_uri: str | None = None,
            repo_root: Path | None = None, template_dir: Path | None = None,
            registered: dict[str, list[str]] | None = None) -> Rebuild:
    """Render the catalogue for ``runs`` and splice it into the README text (nothing written)."""
    readme = Path(readme)
    context = build_context(runs, tracking_uri, registered)
    block = render(context, template_dirs(repo_root, template_dir))
    old = read_readme(readme)
    return Rebuild(readme, old, splice(old, block, readme), context["model_count"])


# --- --import-history -------------------------------------------------------------------------

SUBJECT_RE = re.compile(
    r"(?:model\s*run\s*)?"
    r"(?:code\s*name\s*:\s*(?P<codename>\S+?)\s*,?\s*)?"
    r"run\s*id\s*:\s*(?P<run_id>[0-9a-f]{32})\b\s*,?\s*"
    r"experiment\s*id\s*:\s*(?P<experiment_id>[\w-]+)",
    re.IGNORECASE,
)


def parse_subject(subject: str) -> dict | None:
    """``{"codename", "run_id", "experiment_id"}`` of a model commit subject, else None."""
    match = SUBJECT_RE.search(subject)
    return match.groupdict() if match else None


@dataclass
class ImportReport:
    tagged: list[tuple[str, str, str | None]] = field(default_factory=list)  # sha, run, codename
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # sha, run, why
    unmatched: list[tuple[str, str, str]] = field(default_factory=list)  # sha, run, why

    def lines(self) -> list[str]:
        out = [f"tagged {run} (commit {sha}){f' as {name}' if name else ''}"
               for sha, run, name in self.tagged]
        out += [f"skipped {run} (commit {sha}): {why}" for sha, run, why in self.skipped]
        out += [f"unmatched: commit {sha} run {run}: {why}" for sha, run, why in self.unmatched]
        return out


def model_commits(root: Path) -> list[tuple[str, dict]]:
    """(sha, parsed subject) of every model commit on any ref, oldest first, one per run ID.

    A run ID named by several commits (a rebased or cherry-picked copy) keeps the oldest.
    """
    from nf1prov.provenance import git

    found: dict[str, tuple[str, dict]] = {}
    rows = sorted(git.log_subjects(root, all_refs=True), key=lambda r: r[2])
    for sha, subject, _ in rows:
        parsed = parse_subject(subject)
        if parsed and parsed["run_id"] not in found:
            found[parsed["run_id"]] = (sha, parsed)
    return list(found.values())


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run


def backfill_tags(root: Path, run, sha: str) -> dict[str, str]:
    """The nf1prov tags a pre-nf1prov model run gets from its commit."""
    from nf1prov.provenance import git

    tags = {tracking.GIT_COMMIT: sha, tracking.KIND: tracking.KIND_MODEL}
    name = run.info.run_name or ""
    if git.CODENAME_RE.match(name):
        tags[tracking.CODENAME] = name
        if git.tag_sha(root, git.model_tag(name)) is not None:
            tags[tracking.GIT_TAG] = git.model_tag(name)
    return tags


def import_history(root: Path, client) -> ImportReport:
    """Tag runs named by model commits on any branch; never touch a run nf1prov already tags."""
    from mlflow.entities import RunTag

    report = ImportReport()
    for sha, parsed in model_commits(root):
        run_id = parsed["run_id"]
        run = _get_run(client, run_id)
        if run is None:
            report.unmatched.append((sha, run_id, "no such run in the tracking store"))
            continue
        if run.data.tags.get(tracking.KIND):
            report.skipped.append((sha, run_id, "already has nf1prov tags"))
            continue
        tags = backfill_tags(root, run, sha)
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        report.tagged.append((sha, run_id, tags.get(tracking.CODENAME)))
    return report
