"""Tag values longer than MLflow keeps (8,000 characters): notes, descriptions and the helper that
splits a long value over several tags, on a real sqlite store with runs made through
MlflowClient (no training). Runs damaged before the split existed are read as far as they parse,
with a warning naming the run."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from nf1prov import catalog, tracking
from nf1prov.cli import cli
from nf1prov.commands.note import append_note
from nf1prov.provenance import run_tags
from tests.catalog_runs import client_for, experiment, model_run

CODENAME = "calm-cod-7"


@pytest.fixture
def client(tracking_uri):
    return client_for(tracking_uri)


def words(prefix: str, length: int) -> str:
    """``length`` characters of text that the catalogue prints as itself (no Markdown to
    escape, single spaces), starting with ``prefix``."""
    text = prefix
    i = 0
    while len(text) < length:
        text += f" w{i}"
        i += 1
    return text[:length].rstrip()


def invoke(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def shown(codename: str = CODENAME) -> dict:
    result = invoke("show", codename, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def catalogue(tmp_path: Path, client) -> str:
    readme = tmp_path / "README.md"
    return catalog.rebuild(readme, catalog.fetch_runs(client)).new


def note_lines(text: str) -> list[str]:
    return [line[len("> **Note:** "):-len(" <br>")] for line in text.splitlines()
            if line.startswith("> **Note:** ")]


# --- the split itself ---------------------------------------------------------------------

def test_limit_is_mlflows():
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    assert tracking.TAG_VALUE_LIMIT == MAX_TAG_VAL_LENGTH


@pytest.mark.parametrize("length", [0, 1, 8000, 8001, 24_000, 24_001])
def test_long_tag_round_trip_and_each_part_fits(length):
    value = "".join(chr(0x41 + i % 26) for i in range(length))
    stored = tracking.long_tag("nf1prov.x", value)
    assert all(len(v) <= tracking.TAG_VALUE_LIMIT for v in stored.values())
    assert stored["nf1prov.x"] == value[:tracking.TAG_VALUE_LIMIT]  # what MLflow's UI shows
    assert (len(stored) == 1) == (length <= tracking.TAG_VALUE_LIMIT)
    assert tracking.read_long_tags({**stored, "other": "o"}) == ({"nf1prov.x": value,
                                                                   "other": "o"}, [])


def test_a_missing_part_is_reported_not_hidden():
    stored = tracking.long_tag("nf1prov.x", "a" * 20_000)
    del stored["nf1prov.x.more.1"]
    tags, problems = tracking.read_long_tags(stored)
    assert tags == {"nf1prov.x": "a" * 8_000}  # as far as the parts go without a gap
    assert problems and "nf1prov.x" in problems[0] and "8000 of its 20000" in problems[0]


def test_json_array_prefix_keeps_complete_items_only():
    assert tracking.json_array_prefix('["a", "b", ["c", "d') == ["a", "b", ["c"]]
    assert tracking.json_array_prefix('["a", "b\\u00') == ["a"]
    assert tracking.json_array_prefix('["a", 12') == ["a"]  # a number may be cut short
    assert tracking.json_array_prefix('["a", "b"') == ["a", "b"]
    assert tracking.json_array_prefix("[not json") is None
    assert tracking.json_array_prefix("plain text") is None


def test_ui_hint_is_shell_quoted(tmp_path, tracking_uri):
    uri = f"sqlite:///{tmp_path}/with space/mlflow.db"
    assert shlex.split(tracking.ui_hint(uri)) == ["mlflow", "ui", "--backend-store-uri", uri]
    assert tracking.ui_hint("http://lab:5000") == "http://lab:5000"
    # `show` prints it: a store in a folder with a space pastes into a shell as one argument
    spaced = tmp_path / "with space"
    spaced.mkdir()
    (spaced / "mlflow.db").write_bytes(Path(tracking_uri[len("sqlite:///"):]).read_bytes())
    spaced_uri = f"sqlite:///{spaced / 'mlflow.db'}"
    c = client_for(spaced_uri)
    model_run(c, experiment(c), CODENAME)
    out = invoke("show", CODENAME, "--tracking-uri", spaced_uri).stdout
    line = next(line for line in out.splitlines() if line.startswith("MLflow UI: "))
    assert shlex.split(line[len("MLflow UI: "):])[-1] == spaced_uri


# --- notes ----------------------------------------------------------------------------------

def test_three_notes_of_3000_characters_are_all_kept(tmp_path, client):
    model_run(client, experiment(client), CODENAME)
    notes = [words(f"note{i}", 3000) for i in range(1, 4)]
    for text in notes:
        result = invoke("note", CODENAME, text)
        assert result.exit_code == 0, result.output
    assert "now has 3 note(s)" in result.stdout
    assert shown()["notes"] == notes
    assert note_lines(catalogue(tmp_path, client)) == notes
    text = invoke("show", CODENAME).stdout
    assert all(f"  - {n}" in text for n in notes)


def test_25_notes_are_kept_in_order(tmp_path, client):
    run_id = model_run(client, experiment(client), CODENAME).info.run_id
    notes = [words(f"note{i}", 420) for i in range(25)]
    for text in notes:  # as fast as one process can: same-millisecond notes keep their order
        append_note(client, client.get_run(run_id), text)
    assert shown()["notes"] == notes
    assert note_lines(catalogue(tmp_path, client)) == notes


def test_a_note_of_20000_characters_is_kept_whole(tmp_path, client):
    model_run(client, experiment(client), CODENAME)
    text = words("long", 20_000)
    assert invoke("note", CODENAME, text).exit_code == 0
    record = shown()
    assert record["notes"] == [text]
    assert not any(".more." in key or key.startswith(tracking.NOTES) for key in record["tags"])
    assert note_lines(catalogue(tmp_path, client)) == [text]


CONCURRENT_NOTES = """
import sys, time
from pathlib import Path
from nf1prov.commands.common import open_store
from nf1prov.commands.note import append_note
from nf1prov.provenance.train_flow import find_run
folder, codename = Path(sys.argv[1]), sys.argv[2]
_, _, client = open_store(None)  # MLflow imported and the store open before the start line
(folder / "ready").touch()
while not (folder / "go").exists():
    time.sleep(0.005)
for i in range(10):  # what `nf1prov note` does, as fast as it goes
    append_note(client, find_run(client, codename), f"other {i}")
"""


def test_concurrent_notes_lose_none(tmp_path, client):
    """This process and another add 10 notes each at the same time: all 20 are kept."""
    from nf1prov.provenance.train_flow import find_run

    model_run(client, experiment(client), CODENAME)
    other = subprocess.Popen([sys.executable, "-c", CONCURRENT_NOTES, str(tmp_path), CODENAME],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline and other.poll() is None, other.communicate()
        time.sleep(0.01)
    (tmp_path / "go").touch()
    for i in range(10):
        append_note(client, find_run(client, CODENAME), f"this {i}")
    _, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    notes = shown()["notes"]
    assert sorted(notes) == sorted(f"{who} {i}" for who in ("this", "other") for i in range(10))
    for who in ("this", "other"):  # each writer's notes in the order it wrote them
        assert [n for n in notes if n.startswith(who)] == [f"{who} {i}" for i in range(10)]


# --- runs damaged by MLflow's cut, before notes had a tag each -------------------------------

def test_a_legacy_notes_array_cut_by_mlflow_is_read_as_far_as_it_parses(tmp_path, client):
    old = [words(f"old{i}", 3000) for i in range(1, 4)]
    cut = json.dumps(old)[:8000]  # what MLflow kept: it ends inside the third note
    assert old[2][:100] in cut and old[2] not in cut
    run = model_run(client, experiment(client), CODENAME, extra_tags={tracking.NOTES: cut})

    result = invoke("show", CODENAME)
    assert result.exit_code == 0
    assert all(f"  - {n}" in result.stdout for n in old[:2]) and old[2][:50] not in result.stdout
    assert CODENAME in result.stderr and "8,000-character" in result.stderr

    assert shown()["notes"] == old[:2]
    assert note_lines(catalogue(tmp_path, client)) == old[:2]

    result = invoke("note", CODENAME, "after the cut")
    assert result.exit_code == 0 and "now has 3 note(s)" in result.stdout
    assert "8,000-character" in result.stderr
    assert shown()["notes"] == [*old[:2], "after the cut"]
    assert client.get_run(run.info.run_id).data.tags[tracking.NOTES] == cut  # left as it was


def test_a_legacy_description_array_cut_by_mlflow_shows_its_complete_bullets(tmp_path, client,
                                                                           capsys):
    items = [words(f"item{i}", 1000) for i in range(10)]
    cut = json.dumps(items)[:8000]
    model_run(client, experiment(client), CODENAME,
              extra_tags={tracking.DESCRIPTION_PREFIX + "data": cut})
    capsys.readouterr()
    text = catalogue(tmp_path, client)
    assert "- **Data:**" in text and '["item' not in text
    assert [line[4:] for line in text.splitlines() if line.startswith("  - item")] == items[:7]
    err = capsys.readouterr().err
    assert CODENAME in err and "nf1prov.description.data" in err and "8,000-character" in err


# --- descriptions written by a training -------------------------------------------------------

def test_a_description_over_8000_characters_reaches_the_catalogue_whole(tmp_path, client):
    from mlflow.entities import RunTag

    items = [words(f"step{i}", 700) for i in range(20)]  # 14,000 characters and more as JSON
    description = {"summary": words("summary", 9000), "preprocessing": items}
    tags = run_tags.creation_tags(tracking.KIND_MODEL, description)  # as `train` writes them
    assert all(len(value) <= tracking.TAG_VALUE_LIMIT for value in tags.values())
    exp = experiment(client)
    run = client.create_run(exp, run_name=CODENAME, tags=tags)
    client.log_batch(run.info.run_id, tags=[RunTag(tracking.CODENAME, CODENAME),
                                            RunTag(tracking.GIT_COMMIT, "ab" * 20)])
    client.set_terminated(run.info.run_id, "FINISHED")

    text = catalogue(tmp_path, client)
    assert f"- **Summary:** {description['summary']}" in text
    assert [line[4:] for line in text.splitlines() if line.startswith("  - step")] == items
    record = shown()
    assert record["tags"][tracking.DESCRIPTION_PREFIX + "preprocessing"] == json.dumps(items)
    # The MLflow UI shows one tag: the Markdown there is cut at a line, saying where the rest is
    note = client.get_run(run.info.run_id).data.tags[tracking.NOTE_CONTENT]
    assert len(note) <= tracking.TAG_VALUE_LIMIT and "nf1prov.description" in note


# --- other values that grow -------------------------------------------------------------------

def test_a_long_command_line_and_many_resumes_are_kept_whole(client):
    from nf1prov.provenance import training

    run_id = client.create_run(experiment(client)).info.run_id
    argv = ["train", *(f"--set=description.data=item{i}" for i in range(400))]  # ~12,000
    run_tags.log_environment(client, run_id, argv)
    tags, problems = tracking.read_long_tags(client.get_run(run_id).data.tags)
    assert json.loads(tags["nf1prov.env.argv"]) == argv and not problems
    run_tags.log_environment(client, run_id, ["train", "--resume", CODENAME])  # shorter
    tags, problems = tracking.read_long_tags(client.get_run(run_id).data.tags)
    assert json.loads(tags["nf1prov.env.argv"]) == ["train", "--resume", CODENAME]
    assert not problems

    earlier = [1_700_000_000.125 + i for i in range(600)]  # 600 resumes: over 8,000 characters
    client.set_tag(run_id, training.RESUMED_AT, json.dumps(earlier[:300]))
    for _ in range(2):
        training.record_resume(client, run_id)
    tags, problems = tracking.read_long_tags(client.get_run(run_id).data.tags)
    resumed = json.loads(tags[training.RESUMED_AT])
    assert resumed[:300] == earlier[:300] and len(resumed) == 302 and not problems
    old_run = client.create_run(experiment(client)).info.run_id  # resumed before the split
    client.set_tag(old_run, training.RESUMED_AT, json.dumps(earlier))  # MLflow cuts it
    training.record_resume(client, old_run)  # read as far as it parses: no traceback
    resumed = json.loads(tracking.read_long_tags(client.get_run(old_run).data.tags)[0][
        training.RESUMED_AT])
    assert resumed[:-1] == earlier[:len(resumed) - 1] and len(resumed) > 400
