"""Catalogue rendering and README splicing, on real runs in a real sqlite MLflow store."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from nf1prov import catalog, tracking
from nf1prov.errors import UserError
from tests.catalog_runs import (
    UPSTREAM_DESCRIPTION,
    UPSTREAM_ENTRY,
    UPSTREAM_NOTE,
    UPSTREAM_SHA,
    client_for,
    experiment,
    model_run,
)

REPO = Path(__file__).resolve().parents[1]
ADDED_PREFIXES = ("- **Run:**", "- **Trained on:**", "- **Holdout patients:**", "- **Epochs:**",
                  "- **Best validation Dice:**", "- **Holdout Dice:**", "- **Holdout IoU:**",
                  "- **Reproduced:**")


def build(tmp_path: Path, client, readme_text: str | None = None, **kwargs) -> catalog.Rebuild:
    readme = tmp_path / "README.md"
    if readme_text is not None:
        readme.write_bytes(readme_text.encode())
    return catalog.rebuild(readme, catalog.fetch_runs(client), **kwargs)


def block_of(text: str) -> str:
    return text.split(catalog.BEGIN_MARKER, 1)[1].split(catalog.END_MARKER, 1)[0]


def entries_of(text: str) -> list[str]:
    """The per-model entries of a rendered README (text between the --- separators)."""
    parts = re.split(r"^---$", block_of(text), flags=re.MULTILINE)
    return [p.strip("\n") for p in parts if "**Commit:**" in p]


def is_subsequence(needles: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(any(line == hay for hay in it) for line in needles)


@pytest.fixture
def client(tracking_uri):
    return client_for(tracking_uri)


def test_upstream_entry_is_reproduced_line_for_line(tmp_path, client):
    exp = experiment(client)
    model_run(client, exp, "fearless-eel-256", sha=UPSTREAM_SHA,
              description=UPSTREAM_DESCRIPTION, notes=[UPSTREAM_NOTE],
              metrics={"best_val_dice_background": 0.98765, "best_val_dice_inner-cell": 0.9,
                       "best_val_dice_cell-boundary": 0.5},
              params={"data.holdout_patients": "['NF0014']"})
    text = build(tmp_path, client).new
    block = block_of(text).splitlines()
    assert block[1:5] == [f"All models below were trained with Experiment ID: {exp}", "",
                          "These are the models developed in reverse chronological order:", ""]
    [entry] = entries_of(text)
    rendered, upstream = entry.splitlines(), UPSTREAM_ENTRY.splitlines()
    assert is_subsequence(upstream, rendered)
    added = [line for line in rendered if line not in upstream]
    assert all(line.startswith(ADDED_PREFIXES) for line in added), added
    assert "- **Holdout patients:** NF0014" in added
    assert ("- **Best validation Dice:** background 0.988, inner-cell 0.900, cell-boundary 0.500"
            in added)


def test_newest_first_grouped_by_experiment_and_rebuild_is_byte_identical(tmp_path, client):
    a, b = experiment(client, "a"), experiment(client, "b")
    model_run(client, a, "old-owl-1", start_time=1_000_000)
    model_run(client, b, "mid-mole-2", start_time=2_000_000)
    model_run(client, a, "new-newt-3", start_time=3_000_000)
    model_run(client, a, "trial-tern-4", start_time=4_000_000,
              extra_tags={tracking.KIND: tracking.KIND_TRIAL})
    first = build(tmp_path, client, "# Project\n")
    catalog.write_atomic(first.readme, first.new)
    second = build(tmp_path, client)
    assert not second.changed and second.new == first.new
    codenames = re.findall(r"^\*\*Codename:\*\* (\S+)$", first.new, flags=re.MULTILINE)
    assert codenames == ["new-newt-3", "old-owl-1", "mid-mole-2"]  # trial never listed
    experiments = re.findall(r"Experiment ID: (\S+)$", first.new, flags=re.MULTILINE)
    assert experiments == [a, b]


def test_empty_store_renders_a_placeholder(tmp_path, client):
    text = build(tmp_path, client, "").new
    assert text == ("## Model Descriptions\n" + catalog.BEGIN_MARKER + "\n"
                    "No models recorded yet: train one with `nf1prov train`.\n"
                    + catalog.END_MARKER + "\n")


def test_crlf_readme_keeps_crlf_and_outside_bytes(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7", description=UPSTREAM_DESCRIPTION)
    before = "# Title\r\n\r\nIntro  \r\n## Model Descriptions\r\n" + catalog.BEGIN_MARKER
    after = catalog.END_MARKER + "\r\n\r\n## License\r\nMIT"  # no final newline: kept so
    result = build(tmp_path, client, before + "\r\nstale\r\n" + after)
    assert result.new.startswith(before) and result.new.endswith(after)
    inner = block_of(result.new)
    assert inner.count("\r\n") == inner.count("\n") > 10
    assert "\r\r" not in inner and "stale" not in inner
    catalog.write_atomic(result.readme, result.new)
    assert not build(tmp_path, client).changed


def test_markers_inserted_under_existing_heading(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7")
    original = "# T\n\n## Model Descriptions\nHand-written notes.\n\n## Next\ntext\n"
    new = build(tmp_path, client, original).new
    head, rest = new.split(catalog.BEGIN_MARKER, 1)
    assert head == "# T\n\n## Model Descriptions\n"
    assert rest.split(catalog.END_MARKER + "\n", 1)[1] == "Hand-written notes.\n\n## Next\ntext\n"


def test_heading_and_markers_appended_when_missing(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7")
    new = build(tmp_path, client, "# T\nno newline at end").new
    assert new.startswith("# T\nno newline at end\n\n## Model Descriptions\n" +
                          catalog.BEGIN_MARKER + "\n")
    assert new.endswith(catalog.END_MARKER + "\n")


def test_marker_lines_with_surrounding_blanks_are_kept_whole(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7")
    head = "x\n  " + catalog.BEGIN_MARKER + "\t\n"
    tail = "   " + catalog.END_MARKER + "  \n\n## Citation\n\n    code\n"
    result = build(tmp_path, client, head + "stale\n" + tail)
    assert result.new.startswith(head) and result.new.endswith(tail)
    assert "stale" not in result.new and "calm-cod-7" in block_of(result.new)


@pytest.mark.parametrize("readme", [
    f"{catalog.BEGIN_MARKER}\n",
    f"{catalog.END_MARKER}\n{catalog.BEGIN_MARKER}\n",
    f"{catalog.BEGIN_MARKER}\n{catalog.END_MARKER}\n{catalog.BEGIN_MARKER}\n",
])
def test_broken_markers_are_refused(tmp_path, client, readme):
    with pytest.raises(UserError, match="markers are broken"):
        build(tmp_path, client, readme)


NASTY = [
    "<script>alert(1)</script>",
    "# not a heading",
    "ends the marker --> here",
    "`code` and | pipe | table",
    "two\nlines\r\n- and a list",
    "[link](javascript:alert(1)) ![img](x.png) *bold* _em_ ~~s~~ $x$ &amp; \\",
]


def test_user_text_cannot_break_the_page(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7", notes=NASTY,
              description={"architecture": "<b>UNet</b>", "data": ["# h", ["- x", "1. y"]]},
              status="FAILED", extra_tags={tracking.FAILURE: "OOM\n## injected"})
    text = build(tmp_path, client, "").new
    assert text.count("-->") == 2  # the two markers, nothing else
    block = block_of(text)
    assert "<script" not in block and "<b>" not in block and "[link](javascript" not in block
    assert not re.search(r"^\s*#", block, flags=re.MULTILINE)
    lines = block.splitlines()
    notes = [line for line in lines if line.startswith("> **Note:**")]
    assert len(notes) == len(NASTY)  # each note stayed on one line
    assert notes[3] == "> **Note:** \\`code\\` and \\| pipe \\| table <br>"
    assert notes[4] == "> **Note:** two lines - and a list <br>"
    assert "> **Important!!!** This run failed: OOM ## injected <br>" in lines
    assert "  - \\# h" in lines and "    - \\- x" in lines and "    - 1\\. y" in lines
    assert "- **Architecture:** &lt;b&gt;UNet&lt;/b&gt;" in lines


@pytest.mark.parametrize(("raw", "escaped"), [
    ("Inner-cell (one-to-one): 0.5", "Inner-cell (one-to-one): 0.5"),
    ("snake_case_name", "snake_case_name"),
    ("_em_ *b*", "\\_em\\_ \\*b\\*"),
    ("a & b &amp; c", "a & b &amp;amp; c"),
    ("+ item", "\\+ item"),
    ("2) item", "2\\) item"),
    ("   padded  ", "padded"),
    ("tab\there\x00", "tab here"),
])
def test_escape_md(raw, escaped):
    assert catalog.escape_md(raw) == escaped


def test_code_span_survives_backticks():
    assert catalog.code_span("a`b") == "``a`b``"
    assert catalog.code_span("`x`") == "`` `x` ``"


def test_templates_look_up_dict_keys_by_jinjas_rules():
    """The environment reaches a dict's keys without Jinja's attribute-first detour, and keeps
    its rules: a dict method wins over a key of the same name, a missing key is an error."""
    import jinja2

    env = catalog.environment(catalog.template_dirs(None, None))
    text = ("{{ d.codename }} {{ d.items is callable }} {{ d['items'] }} {{ d.keys()|list|length }}"
            " {{ d.get('x', 'y') }} {{ (d.codename ~ '*')|md }} {{ [d.codename]|items }}")
    values = {"codename": "a_b <i>", "items": "mine", "x": 1}
    assert env.from_string(text).render(d=values) == (
        "a_b &lt;i&gt; True mine 3 1 a_b &lt;i&gt;\\* a_b &lt;i&gt;")
    with pytest.raises(jinja2.UndefinedError, match="has no attribute 'missing'"):
        env.from_string("{{ d.missing }}").render(d=values)


def test_failed_killed_and_running_runs_are_flagged_by_their_recorded_status(tmp_path, client):
    exp = experiment(client)
    model_run(client, exp, "fail-fox-1", status="FAILED", start_time=1_000,
              extra_tags={tracking.FAILURE: "CUDA out of memory"})
    model_run(client, exp, "kill-kid-2", status="KILLED", start_time=2_000)
    model_run(client, exp, "dead-doe-3", status=None, start_time=3_000,
              extra_tags={tracking.HEARTBEAT: "1000.0", tracking.HOST: "elsewhere"})
    important = [line for line in build(tmp_path, client, "").new.splitlines()
                 if line.startswith("> **Important!!!**")]
    assert important == [
        # RUNNING in the store, whatever its heartbeat: `nf1prov list --reap` records a crash
        "> **Important!!!** This model is still training: its figures are not final <br>",
        "> **Important!!!** This run was killed (no reason recorded) <br>",
        "> **Important!!!** This run failed: CUDA out of memory <br>",
    ]


def test_holdout_figures_and_ui_link_for_http_servers_only(tmp_path, client):
    run = model_run(client, experiment(client), "calm-cod-7",
                    metrics={"holdout_dice_background": 0.5, "holdout_dice_cell-boundary": 0.25,
                             "holdout_iou_inner-cell": float("nan")})
    text = build(tmp_path, client, "", tracking_uri="https://user:secret@mlflow.lab:8443/").new
    assert "- **Holdout Dice:** background 0.500, cell-boundary 0.250" in text
    assert "- **Holdout IoU:** inner-cell n/a" in text
    url = (f"https://mlflow.lab:8443/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
           f"{tracking.ML_PAGES}")
    assert f"[MLflow UI]({url})" in text and "secret" not in text
    assert "MLflow UI" not in build(tmp_path, client, "", tracking_uri="sqlite:///x.db").new


def test_health_warnings_show_between_important_and_notes_and_rebuild_identically(tmp_path,
                                                                                 client):
    exp = experiment(client)
    warned = ("warning: did not learn to find cells (val inner-cell Dice 0.004 <= 0.05); "
              "still improving at the last epoch (best epoch 2 of 2) <b>")
    model_run(client, exp, "sad-sow-1", sha=UPSTREAM_SHA, description=UPSTREAM_DESCRIPTION,
              notes=[UPSTREAM_NOTE], extra_tags={tracking.HEALTH: warned}, start_time=4_000)
    model_run(client, exp, "fail-fox-2", status="FAILED", start_time=3_000,
              extra_tags={tracking.FAILURE: "OOM", tracking.HEALTH: "warning: diverged"})
    model_run(client, exp, "fine-fly-3", extra_tags={tracking.HEALTH: "ok"}, start_time=2_000)
    model_run(client, exp, "old-owl-4", start_time=1_000)  # trained before the tag existed
    first = build(tmp_path, client, "# Project\n")
    sad, failed, fine, old = entries_of(first.new)
    assert sad.splitlines()[:6] == [
        f"**Commit:** `{UPSTREAM_SHA}` <br>", "**Codename:** sad-sow-1", "",
        "> **Warning:** did not learn to find cells (val inner-cell Dice 0.004 &lt;= 0.05) <br>",
        "> **Warning:** still improving at the last epoch (best epoch 2 of 2) &lt;b&gt; <br>",
        f"> **Note:** {UPSTREAM_NOTE} <br>"]
    assert failed.splitlines()[3:5] == ["> **Important!!!** This run failed: OOM <br>",
                                        "> **Warning:** diverged <br>"]
    assert "Warning" not in fine + old and "> " not in fine + old
    catalog.write_atomic(first.readme, first.new)
    second = build(tmp_path, client)
    assert not second.changed and second.new == first.new


def test_holdout_instance_scores_beside_the_baselines(tmp_path, client):
    exp = experiment(client)
    model_run(client, exp, "eval-eel-1", start_time=3_000,
              metrics={"holdout_dice_inner-cell": 0.8, "holdout_iou_inner-cell": 0.7,
                       "holdout_instance_f1": 0.85, "holdout_instance_ap": 0.61,
                       "holdout_baseline_instance_f1": 0.35,
                       "holdout_baseline_instance_ap": 0.2,
                       "holdout_instance_precision": 0.9, "holdout_instance3d_f1": 0.82,
                       "holdout_baseline_instance3d_f1": 0.54},
              extra_tags={"nf1prov.evaluation.patients": '["NF0014_T1", "NF0014_T2"]'})
    model_run(client, exp, "solo-seal-2", start_time=2_000,  # evaluated without --baseline
              metrics={"holdout_instance_f1": 0.7, "holdout_instance_ap": float("nan")})
    model_run(client, exp, "new-newt-3", start_time=1_000)  # never evaluated
    first = build(tmp_path, client, "")
    both, solo, never = (entry.splitlines() for entry in entries_of(first.new))
    assert both[-3:] == [
        "- **Holdout Dice:** inner-cell 0.800", "- **Holdout IoU:** inner-cell 0.700",
        "- **Holdout instances:** F1 0.850 (baseline 0.350), AP 0.610 (baseline 0.200), "
        "3-D F1 0.820 (baseline 0.540) on NF0014_T1, NF0014_T2"]
    assert solo[-1] == "- **Holdout instances:** F1 0.700, AP n/a"  # no 3-D F1 logged
    assert not [line for line in never if "Holdout" in line]
    catalog.write_atomic(first.readme, first.new)
    assert build(tmp_path, client).new == first.new


def test_reproduction_outcome_is_shown_escaped(tmp_path, client):
    exp = experiment(client)
    model_run(client, exp, "calm-cod-7",
              extra_tags={tracking.REPRODUCED: "identical (run ab12, 2026-11-26) <b>"})
    model_run(client, exp, "bold-owl-8", start_time=1_700_000_001_000)
    text = build(tmp_path, client, "").new
    entries = entries_of(text)
    assert r"- **Reproduced:** identical (run ab12, 2026-11-26) &lt;b&gt;" in entries[1]
    assert "Reproduced" not in entries[0]


def test_description_fields_string_inline_array_nested_unknown_last():
    tags = {tracking.DESCRIPTION_PREFIX + "loss": '["a", ["b", ["c"]]]',
            tracking.DESCRIPTION_PREFIX + "task": "[not json",
            tracking.DESCRIPTION_PREFIX + "optimizer_notes": "Adam",
            tracking.DESCRIPTION_PREFIX + "qc": "   "}
    fields = catalog.description(tags)
    assert [f["label"] for f in fields] == ["Task", "Loss", "Optimizer notes"]
    assert fields[0]["text"] == "[not json"
    assert [(b["indent"], b["text"]) for b in fields[1]["bullets"]] == [
        ("", "a"), ("  ", "b"), ("    ", "c")]


def test_strict_undefined_names_the_template(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7")
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "catalog_entry.md.j2").write_text("{{ entry.no_such_field }}\n")
    with pytest.raises(UserError, match=r"catalog_entry\.md\.j2.*no_such_field"):
        build(tmp_path, client, "", template_dir=tmp_path / "tpl")


def test_template_dir_overrides_and_falls_back_to_packaged(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7", notes=["<i>x</i>"])
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "catalog_entry.md.j2").write_text(
        "* {{ entry.codename }}: {{ entry.notes[0] }} {{ entry.commit|code }}\n")
    block = block_of(build(tmp_path, client, "", template_dir=tmp_path / "tpl").new)
    assert f"* calm-cod-7: &lt;i&gt;x&lt;/i&gt; `{'ab' * 20}`" in block.splitlines()
    assert "These are the models developed in reverse chronological order:" in block
    with pytest.raises(UserError, match="no such directory"):
        build(tmp_path, client, "", template_dir=tmp_path / "missing")


def test_repository_templates_folder_is_used_first(tmp_path, client):
    model_run(client, experiment(client), "calm-cod-7")
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "catalog.md.j2").write_text("{{ model_count }} model(s)\n")
    assert block_of(build(tmp_path, client, "", repo_root=tmp_path).new) == "\n1 model(s)\n"


def test_template_emitting_a_marker_is_refused(tmp_path, client):
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "catalog.md.j2").write_text("text\n  " + catalog.END_MARKER + "\n")
    with pytest.raises(UserError, match=r"line holding only .* \(output line 2\)"):
        build(tmp_path, client, "", template_dir=tmp_path / "tpl")


def test_wheel_ships_templates_and_configs(tmp_path):
    """A non-editable install finds templates/ and configs/ inside the package."""
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("nf1prov-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for folder in ("templates", "configs"):
        for path in (REPO / folder).iterdir():
            assert f"nf1prov/{folder}/{path.name}" in names


def test_write_atomic_keeps_mode_and_leaves_no_temp_file(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("old")
    os.chmod(readme, 0o640)
    catalog.write_atomic(readme, "new\r\n")
    assert readme.read_bytes() == b"new\r\n"
    assert stat.S_IMODE(readme.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]
