"""The model description of a config's ``[description]`` as MLflow tags and as Markdown.

DESIGN 3.3: tag ``nf1prov.description.<field>`` holds a string, or a JSON array of items where
an array inside the array holds the sub-items of the item before it (upstream's nested bullets).
The same encoding is read back by the catalogue, so keep it in this one place.
"""

from __future__ import annotations

import json
from typing import Any

from nf1prov.tracking import DESCRIPTION_PREFIX

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
    """Inverse of ``encode_value``: a JSON array back to a list, anything else as the string."""
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list):
            return value
    return text


def description_tags(description: dict[str, Any]) -> dict[str, str]:
    """``{"nf1prov.description.<field>": encoded value}`` for every field of the section.

    Empty fields are kept (as ""), so a run says explicitly that a field was left blank.
    """
    return {f"{DESCRIPTION_PREFIX}{field}": encode_value(value)
            for field, value in description.items()}


def _bullets(items: list, depth: int) -> list[str]:
    """Markdown bullets; a list inside the list nests under the item before it."""
    lines: list[str] = []
    for item in items:
        if isinstance(item, list):
            lines.extend(_bullets(item, depth + 1))
        else:
            lines.append(f"{'  ' * depth}- {item}")
    return lines


def description_markdown(description: dict[str, Any]) -> str:
    """The description as Markdown for ``mlflow.note.content``: summary paragraph, then one
    bullet per catalogue field (``- **Data:**`` with nested sub-bullets), blank fields left out.
    """
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
