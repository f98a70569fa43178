"""The model description of a config's ``[description]`` as MLflow tags and as Markdown.

DESIGN 3.3: tag ``nf1prov.description.<field>`` holds a string, or a JSON array of items where
an array inside the array holds the sub-items of the item before it (upstream's nested bullets).
A value longer than MLflow keeps is split over several tags (`tracking.long_tag`). The same
encoding is read back by the catalogue, so keep it in this one place.
"""

from __future__ import annotations

import json
from typing import Any

from nf1prov.tracking import (
    DESCRIPTION_PREFIX,
    TAG_VALUE_LIMIT,
    cut_array,
    json_array_prefix,
    long_tag,
    read_long_tags,
    read_notes,
    warn_damaged,
)

# Catalogue labels (DESIGN 3.4), in catalogue order; `summary` is free text shown first.
FIELD_LABELS = {
    "architecture": "Architecture",
    "task": "Task",
    "qc": "QC / Filtering",
    "data": "Data",
    "preprocessing": "Preprocessing",
    "loss": "Loss",
}


def encode_value(value: str | list) -> str:
    """A description value as a tag value: the string itself, or its JSON array."""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


def decode_value(text: str) -> str | list:
    """Inverse of ``encode_value``: a JSON array back to a list, anything else as the string.
    An array cut short (by MLflow, before values were split) gives its complete items."""
    return _decoded(text)[0]


def _decoded(text: str) -> tuple[str | list, bool]:
    """(`decode_value`, whether ``text`` is an array cut short)."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            prefix = json_array_prefix(text)
            return (text, False) if prefix is None else (prefix, True)
        if isinstance(value, list):
            return value, False
    return text, False


def cut_fields(tags: dict[str, str]) -> list[str]:
    """A sentence for each description tag in ``tags`` whose JSON array was cut short."""
    problems = []
    for key, value in sorted(tags.items()):
        if key.startswith(DESCRIPTION_PREFIX):
            decoded, cut = _decoded(value)
            if cut:
                problems.append(cut_array(key, value, len(decoded), "items"))
    return problems


def readable_tags(run) -> dict[str, str]:
    """``run``'s tags as `show` and the catalogue read them: long values joined
    (`tracking.read_long_tags`). What could not be read whole (a part missing, a notes or
    description array that MLflow cut) is said on stderr, naming the run; the rest is read."""
    tags, problems = read_long_tags(run.data.tags)
    problems += read_notes(tags)[1] + cut_fields(tags)
    warn_damaged(run, problems)
    return tags


def description_tags(description: dict[str, Any]) -> dict[str, str]:
    """``{"nf1prov.description.<field>": encoded value}`` for every field of the section.

    Empty fields are kept (as ""), so a run says explicitly that a field was left blank. A
    value longer than MLflow keeps is split (`tracking.long_tag`), so nothing of it is cut.
    """
    return {key: part for field, value in description.items()
            for key, part in long_tag(f"{DESCRIPTION_PREFIX}{field}", encode_value(value)).items()}


def _bullets(items: list, depth: int) -> list[str]:
    """Markdown bullets; a list inside the list nests under the item before it."""
    lines: list[str] = []
    for item in items:
        if isinstance(item, list):
            lines.extend(_bullets(item, depth + 1))
        else:
            lines.append(f"{'  ' * depth}- {item}")
    return lines


# Where `description_markdown` cuts: the MLflow UI shows one tag of at most TAG_VALUE_LIMIT.
NOTE_CUT = ("\n\n*(Cut here to fit MLflow's {limit:,}-character limit: the whole description is "
            "in this run's `nf1prov.description.*` tags, which `nf1prov show` prints.)*\n")


def description_markdown(description: dict[str, Any]) -> str:
    """The description as Markdown for ``mlflow.note.content``: summary paragraph, then one
    bullet per catalogue field (``- **Data:**`` with nested sub-bullets), blank fields left out.

    MLflow's UI shows this one tag, of at most `TAG_VALUE_LIMIT` characters: a longer
    description is cut at a line, with a last line saying where the whole of it is (the
    ``nf1prov.description.*`` tags keep it whole).
    """
    markdown = _markdown(description)
    if len(markdown) <= TAG_VALUE_LIMIT:
        return markdown
    marker = NOTE_CUT.format(limit=TAG_VALUE_LIMIT)
    kept = markdown[:TAG_VALUE_LIMIT - len(marker)]
    return (kept[:kept.rfind("\n")] if "\n" in kept else kept).rstrip() + marker


def _markdown(description: dict[str, Any]) -> str:
    lines: list[str] = []
    summary = description.get("summary", "")
    if summary:
        lines += [summary if isinstance(summary, str) else "\n".join(_bullets(summary, 0)), ""]
    labels = dict(FIELD_LABELS)
    labels.update({f: f.replace("_", " ").capitalize() for f in description if f not in labels
                   and f != "summary"})
    for field, label in labels.items():
        value = description.get(field, "")
        if not value:
            continue
        if isinstance(value, str):
            lines.append(f"- **{label}:** {value}")
        else:
            lines.append(f"- **{label}:**")
            lines.extend(_bullets(value, 1))
    return "\n".join(lines).strip() + "\n" if lines else ""
