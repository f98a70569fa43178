"""Rendering the catalogue: model runs -> template context (plain dicts of raw user text) ->
Markdown through the Jinja templates, every ``{{ value }}`` escaped for Markdown by the
environment's ``finalize``.

Only committed models are listed (a run without `mlflow.source.git.commit` never got its commit),
and rendering reads nothing but the runs: not the host, its processes or its clock, so the same
store gives the same bytes on any machine at any time (DESIGN 3.4).
"""


from __future__ import annotations

import ast
import datetime as dt
import functools
import json
import math
import re
import traceback
from pathlib import Path

from nf1prov import tracking
from nf1prov.data import CLASS_NAMES
from nf1prov.description import FIELD_LABELS, decode_value, readable_tags
from nf1prov.errors import UserError
from nf1prov.resources import shipped_dir
from nf1prov.train import health

TEMPLATE_NAME = "catalog.md.j2"
PACKAGED_TEMPLATES = shipped_dir("templates")

# (field, label) in upstream order; `summary` is ours and goes first when present.
FIELDS = (("summary", "Summary"), *FIELD_LABELS.items())  # in catalogue order
CLASSES = CLASS_NAMES
SPLITS = ("train", "val", "test")
HOLDOUT_PARAM = "data.holdout_patients"
DATA_ROOT_PARAM = "data.root"
EPOCHS_RUN_METRIC = "epochs_run"
BEST_EPOCH_METRIC = "best_epoch"
# Every param and metric `entry` reads, and only those: `fetch_runs` reads no others, since most
# values of a store are params and metrics that no catalogue shows (the whole config, every
# score of every epoch). tests/test_catalog_store.py checks that `entry` keeps to them.
PARAMS_READ = (DATA_ROOT_PARAM, HOLDOUT_PARAM, *(f"dataset.{split}_fields" for split in SPLITS))
# instance scores of `nf1prov evaluate` (DESIGN 3.7), shown beside the baseline's: (label, name)
INSTANCE_SCORES = (("F1", "instance_f1"), ("AP", "instance_ap"), ("3-D F1", "instance3d_f1"))
METRICS_READ = (EPOCHS_RUN_METRIC, BEST_EPOCH_METRIC,
                *(f"{score}_{c}" for score in ("best_val_dice", "holdout_dice", "holdout_iou")
                  for c in CLASSES),
                *(f"{method}_{name}" for method in ("holdout", "holdout_baseline")
                  for _, name in INSTANCE_SCORES))


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

_DICT_ATTRIBUTES = frozenset(dir(dict))


def environment(template_dirs: list[Path]):
    """The Jinja environment of the catalogue templates (Markdown escaping, filters).

    Made for one rendering: templates are read once (no reload checks, e.g. at every
    ``include`` of the per-model part), and each distinct value is escaped once, since a
    catalogue repeats labels, descriptions and statuses across its models.
    """
    import jinja2
    from markupsafe import Markup

    escape_once = functools.lru_cache(maxsize=None, typed=True)(
        lambda value: Markup(escape_md(value)))

    def md(value) -> Markup:
        try:
            return escape_once(value)
        except TypeError:  # an unhashable value (a list printed by a hand-written template)
            return Markup(escape_md(value))

    def finalize(value):
        # Every {{ value }} is escaped for Markdown unless a filter already made it Markup.
        return value if isinstance(value, Markup) else md(value)

    class Environment(jinja2.Environment):
        def getattr(self, obj, attribute):
            # ``entry.codename``: Jinja tries the attribute first and reaches a dict's key
            # through an AttributeError, at every use. A plain dict's attributes are those of
            # its class, so the key is looked up directly when no such attribute exists.
            if type(obj) is dict and attribute not in _DICT_ATTRIBUTES:
                try:
                    return obj[attribute]
                except KeyError:
                    return self.undefined(obj=obj, name=attribute)
            return super().getattr(obj, attribute)

    env = Environment(
        loader=jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(d)) for d in template_dirs]),
        undefined=jinja2.StrictUndefined,
        autoescape=True,
        finalize=finalize,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        auto_reload=False,
    )
    env.filters["code"] = lambda v: Markup(code_span(v))
    env.filters["md"] = md
    env.filters["link"] = lambda text, url: Markup(f"[{md(text)}]({link_url(url)})")
    env.filters["raw"] = Markup  # explicit opt-out for template authors
    env.filters["scores"] = lambda items: ", ".join(f"{s['name']} {s['value']}" for s in items)
    env.filters["versus"] = lambda items: ", ".join(
        f"{s['name']} {s['value']}" + (f" (baseline {s['baseline']})" if s["baseline"] else "")
        for s in items)
    env.filters["items"] = lambda values: Markup(", ".join(md(v) for v in values))
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
    env = environment(dirs)
    try:
        text = env.get_template(TEMPLATE_NAME).render(**context)
    except Exception as exc:  # a user-edited template can fail in any way: name where
        raise UserError(
            f"The catalogue template {_template_frame(exc)} failed: {exc}. Fix the template "
            f"(looked up in: {', '.join(map(str, dirs))})."
        ) from exc
    return text.replace("\r\n", "\n").rstrip("\n") + "\n"


def render_entry(run, tracking_uri: str | None, dirs: list[Path]) -> tuple[str, dict]:
    """One model's catalogue entry alone (e.g. for an exported package's README): (Markdown,
    the ``entry`` the template got)."""
    entry = build_context([run], tracking_uri)["groups"][0]["entries"][0]
    return environment(dirs).get_template("catalog_entry.md.j2").render(entry=entry), entry


# --- runs -> template context -----------------------------------------------------------------

def parse_items(value: str) -> str | list[dict]:
    """A description tag value: the string itself, or the nested items of its JSON array.

    ``["a", "b", ["b1", ["b1x"]], "c"]`` -> ``[{a}, {b: [b1: [b1x]]}, {c}]``: an array holds the
    sub-items of the item before it (DESIGN 3.3).
    """
    parsed = decode_value(value)
    return _tree(parsed) if isinstance(parsed, list) else parsed


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
    """The description fields of a run, known ones in upstream order, then any others by name
    (a value split over several tags read whole: `tracking.read_long_tags`)."""
    tags = tracking.read_long_tags(tags)[0]
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
    """A run's notes, oldest first (`tracking.read_notes`)."""
    return tracking.read_notes(tracking.read_long_tags(tags)[0])[0]


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


def health_warnings(tags: dict) -> list[str]:
    """The reasons of a `warning: <reason>[; <reason>]...` health verdict (`tracking.HEALTH`),
    one per catalogue line; none for `ok` or a run trained before the verdict existed. A
    verdict in another form is shown whole rather than hidden."""
    verdict = (tags.get(tracking.HEALTH) or "").strip()
    if not verdict or verdict == health.OK:
        return []
    if verdict.startswith(health.WARNING.rstrip()):
        return health.reasons(verdict) or ["no reason recorded"]
    return [verdict]


def holdout_instances(metrics: dict) -> list[dict]:
    """``[{"name": "F1", "value": "0.850", "baseline": "0.350" or None}, ...]`` for the instance
    scores `nf1prov evaluate` logged (the baseline's with ``--baseline``)."""
    return [{"name": label, "value": _fmt(metrics[f"holdout_{name}"]),
             "baseline": (_fmt(metrics[f"holdout_baseline_{name}"])
                          if f"holdout_baseline_{name}" in metrics else None)}
            for label, name in INSTANCE_SCORES if f"holdout_{name}" in metrics]


def evaluated_patients(tags: dict) -> list[str]:
    """The patient folders the latest logged evaluation scored (`EVALUATED_PATIENTS`)."""
    try:
        patients = json.loads(tags.get(tracking.EVALUATED_PATIENTS) or "[]")
    except ValueError:
        return []
    return [str(p) for p in patients] if isinstance(patients, list) else []


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
    info, tags, metrics = run.info, readable_tags(run), run.data.metrics
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
        "warnings": health_warnings(tags),
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
        "holdout_instances": holdout_instances(metrics),
        "evaluated_patients": evaluated_patients(tags),
        "reproduced": tags.get(tracking.REPRODUCED),
        "url": tracking.run_page(ui, info.experiment_id, info.run_id) if ui else None,
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
    ui = tracking.server_ui(tracking_uri)  # a link only where a server serves it
    models = [run for run in newest_first(runs) if is_committed(run)]
    groups: dict[str, dict] = {}
    for run in models:
        exp = run.info.experiment_id
        groups.setdefault(exp, {"experiment_id": exp, "entries": []})
        groups[exp]["entries"].append(entry(run, ui) | {
            "registered": (registered or {}).get(run.info.run_id, [])})
    return {"groups": list(groups.values()), "model_count": len(models)}


def fetch_runs(client) -> list:
    """Every model run in the store, all experiments, newest first: their tags, and of their
    params and metrics those the catalogue shows (at least; `tracking.read_model_runs`)."""
    return newest_first(tracking.read_model_runs(client, params=PARAMS_READ,
                                                 metrics=METRICS_READ))


