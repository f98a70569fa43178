"""`nf1prov note CODENAME TEXT`: append a note to a model (a tag of its own,
``nf1prov.notes.<number>.<random hex>``, `tracking.note_key`; the catalogue shows each as a
`> **Note:**` line)."""

from __future__ import annotations

import click

from nf1prov.commands.common import open_store, tracking_uri_option
from nf1prov.errors import UserError


def append_note(client, run, text: str) -> list[str]:
    """Add ``text`` (whitespace collapsed) to ``run``'s notes; returns all its notes, oldest
    first. The note is a new tag, written in one call (split if long: `tracking.long_tag`), so
    no note is ever cut, and two notes added at once by two processes are both kept."""
    from nf1prov import tracking
    from nf1prov.description import readable_tags

    text = " ".join(text.split())
    if not text:
        raise UserError("The note is empty: pass the text to add, e.g. "
                        "`nf1prov note fearless-eel-256 \"BCE not computed after trial 0\"`.")
    run_id = run.info.run_id
    key = tracking.note_key(run.data.tags)
    tracking.log_tags(client, run_id, {key: text})
    # read back: with the notes other processes added meanwhile; damage said on stderr
    return tracking.read_notes(readable_tags(client.get_run(run_id)))[0]


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
