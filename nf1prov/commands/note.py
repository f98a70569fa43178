"""`nf1prov note CODENAME TEXT`: append a note to a model (tag nf1prov.notes, a JSON array of
strings; the catalogue shows each as a `> **Note:**` line)."""

from __future__ import annotations

import json

import click

from nf1prov.commands.common import open_store, tracking_uri_option
from nf1prov.errors import UserError


def append_note(client, run, text: str) -> list[str]:
    from nf1prov import tracking

    text = " ".join(text.split())
    if not text:
        raise UserError("The note is empty: pass the text to add, e.g. "
                        "`nf1prov note fearless-eel-256 \"BCE not computed after trial 0\"`.")
    try:
        notes = json.loads(run.data.tags.get(tracking.NOTES, "[]"))
    except json.JSONDecodeError:
        notes = []
    if not isinstance(notes, list):
        notes = [str(notes)]
    notes.append(text)
    client.set_tag(run.info.run_id, tracking.NOTES, json.dumps(notes, ensure_ascii=False))
    return notes


@click.command("note")
@click.argument("codename")
@click.argument("text")
@tracking_uri_option
def command(codename, text, tracking_uri) -> None:
    """Append a note to a model (shown by `show` and in the catalogue)."""
    from nf1prov.provenance import train_flow

    _, _, client = open_store(tracking_uri)
    run = train_flow.find_run(client, codename)
    notes = append_note(client, run, text)
    click.echo(f"{run.info.run_name} now has {len(notes)} note(s).")
