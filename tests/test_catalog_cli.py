"""`nf1prov catalog` end to end: real temp git repositories and a real sqlite MLflow store."""

from __future__ import annotations

import pytest

from nf1prov import catalog, tracking
from nf1prov.cli import main
from tests.catalog_runs import client_for, experiment, model_run
from tests.conftest import run_git


def nf1prov(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.fixture
def repo(git_repo, tracking_uri):
    (git_repo / "README.md").write_text("# Project\n\n## Model Descriptions\n\nOld text.\n")
    run_git(git_repo, "add", "README.md")
    run_git(git_repo, "commit", "--quiet", "-m", "Initial")
    return git_repo


@pytest.fixture
def client(tracking_uri):
    return client_for(tracking_uri)


def test_check_passes_on_fresh_readme_and_fails_after_a_new_model(repo, client, capsys,
                                                                   monkeypatch):
    exp = experiment(client)
    model_run(client, exp, "first-fox-1", start_time=1_000)
    monkeypatch.chdir(repo)
    code, out, _ = nf1prov(capsys, "catalog")
    assert code == 0 and "1 model, written" in out
    assert nf1prov(capsys, "catalog")[:2] == (0, f"{repo / 'README.md'}: 1 model, unchanged.\n")
    assert nf1prov(capsys, "catalog", "--check")[0] == 0

    model_run(client, exp, "second-seal-2", start_time=2_000)
    before = (repo / "README.md").read_bytes()
    code, out, err = nf1prov(capsys, "catalog", "--check")
    assert code == 1 and "out of date" in err
    assert "+**Codename:** second-seal-2" in out and out.startswith("--- a/README.md")
    assert (repo / "README.md").read_bytes() == before  # --check writes nothing


def test_commit_commits_readme_alone_and_keeps_other_staged_changes(repo, client, capsys):
    model_run(client, experiment(client), "first-fox-1")
    (repo / "staged.txt").write_text("work in progress\n")
    run_git(repo, "add", "staged.txt")
    readme = str(repo / "README.md")

    code, out, _ = nf1prov(capsys, "catalog", "--readme", readme, "--commit")
    assert code == 0 and "Committed README.md" in out
    assert run_git(repo, "log", "-1", "--format=%s") == "Update model catalogue"
    assert run_git(repo, "show", "--name-only", "--format=", "HEAD") == "README.md"
    assert run_git(repo, "diff", "--cached", "--name-only") == "staged.txt"
    assert run_git(repo, "status", "--porcelain", "--", "README.md") == ""

    head = run_git(repo, "rev-parse", "HEAD")
    code, out, _ = nf1prov(capsys, "catalog", "--readme", readme, "--commit")
    assert code == 0 and "unchanged" in out and "Nothing to commit" in out
    assert run_git(repo, "rev-parse", "HEAD") == head


def test_commit_adds_a_new_untracked_readme(git_repo, tracking_uri, capsys):
    run_git(git_repo, "commit", "--quiet", "--allow-empty", "-m", "Initial")
    code, _, _ = nf1prov(capsys, "catalog", "--readme", str(git_repo / "README.md"), "--commit")
    assert code == 0
    assert run_git(git_repo, "show", "--name-only", "--format=", "HEAD") == "README.md"


def test_check_with_commit_is_a_usage_error(repo, capsys):
    code, _, err = nf1prov(capsys, "catalog", "--readme", str(repo / "README.md"), "--check",
                           "--commit")
    assert code == 2 and "--check only reads" in err


def test_template_option_and_strict_undefined_exit_2(repo, client, capsys, tmp_path):
    model_run(client, experiment(client), "first-fox-1")
    tpl = tmp_path / "tpl"
    tpl.mkdir()
    (tpl / "catalog.md.j2").write_text("{% for g in groups %}{{ g.nope }}{% endfor %}\n")
    code, _, err = nf1prov(capsys, "catalog", "--readme", str(repo / "README.md"),
                           "--template", str(tpl))
    assert code == 2 and "catalog.md.j2 line 1" in err and "nope" in err
    assert "nf1prov:catalog" not in (repo / "README.md").read_text()  # nothing half-written


def commit_subject(repo, subject: str, branch: str | None = None) -> str:
    if branch:
        run_git(repo, "checkout", "--quiet", "-b", branch)
    run_git(repo, "commit", "--quiet", "--allow-empty", "-m", subject)
    sha = run_git(repo, "rev-parse", "HEAD")
    if branch:
        run_git(repo, "checkout", "--quiet", "main")
    return sha


def test_import_history_backfills_both_subject_forms(repo, client, capsys):
    exp = experiment(client)
    new_form = client.create_run(exp, run_name="fearless-eel-256").info.run_id
    old_form = client.create_run(exp, run_name="not a codename").info.run_id
    squashed = client.create_run(exp, run_name="brave-bat-3").info.run_id
    owned = model_run(client, exp, "owned-owl-4").info.run_id
    missing = "f" * 32
    sha_new = commit_subject(
        repo, f"Model run codename: fearless-eel-256 Run ID: {new_form} Experiment ID: {exp}",
        branch="experiments")
    run_git(repo, "tag", "model/fearless-eel-256", sha_new)
    sha_old = commit_subject(repo, f"Run ID:{old_form} Experiment ID:{exp}")
    sha_squashed = commit_subject(repo, f"Model run Run ID:{squashed} Experiment ID:{exp}")
    commit_subject(repo, f"Model run codename: owned-owl-4 Run ID: {owned} Experiment ID: {exp}")
    sha_missing = commit_subject(repo, f"Model run codename: gone-gnu-5 Run ID: {missing} "
                                       f"Experiment ID: {exp}")
    commit_subject(repo, "Fix typo in Run ID docs")
    owned_tags_before = client.get_run(owned).data.tags

    code, out, _ = nf1prov(capsys, "catalog", "--readme", str(repo / "README.md"),
                           "--import-history")
    assert code == 0
    assert f"unmatched: commit {sha_missing} run {missing}" in out
    assert "History: 3 tagged, 1 already tagged, 1 unmatched." in out

    tags = client.get_run(new_form).data.tags
    assert tags[tracking.GIT_COMMIT] == sha_new and tags[tracking.KIND] == "model"
    assert tags[tracking.CODENAME] == "fearless-eel-256"
    assert tags[tracking.GIT_TAG] == "model/fearless-eel-256"
    tags = client.get_run(old_form).data.tags
    assert tags[tracking.GIT_COMMIT] == sha_old and tags[tracking.KIND] == "model"
    assert tracking.CODENAME not in tags and tracking.GIT_TAG not in tags
    tags = client.get_run(squashed).data.tags
    assert tags[tracking.CODENAME] == "brave-bat-3" and tracking.GIT_TAG not in tags
    assert tags[tracking.GIT_COMMIT] == sha_squashed
    assert client.get_run(owned).data.tags == owned_tags_before

    readme = (repo / "README.md").read_text()
    assert readme.count("**Commit:**") == 4  # the catalogue now lists the backfilled models
    code, out, _ = nf1prov(capsys, "catalog", "--readme", str(repo / "README.md"),
                           "--import-history")
    assert "History: 0 tagged, 4 already tagged, 1 unmatched." in out


@pytest.mark.parametrize(("subject", "expected"), [
    ("Model run codename: fearless-eel-256 Run ID: " + "a" * 32 + " Experiment ID: 1857",
     {"codename": "fearless-eel-256", "run_id": "a" * 32, "experiment_id": "1857"}),
    ("Model run codename:calm-cod-1 Run ID:" + "b" * 32 + " Experiment ID:2",
     {"codename": "calm-cod-1", "run_id": "b" * 32, "experiment_id": "2"}),
    ("Run ID:" + "c" * 32 + " Experiment ID:185714796021641116",
     {"codename": None, "run_id": "c" * 32, "experiment_id": "185714796021641116"}),
    ("Model run Run ID: " + "d" * 32 + " Experiment ID: 3",
     {"codename": None, "run_id": "d" * 32, "experiment_id": "3"}),
    ("Run ID: not-a-run Experiment ID: 3", None),
    ("Update model catalogue", None),
])
def test_parse_subject(subject, expected):
    assert catalog.parse_subject(subject) == expected
