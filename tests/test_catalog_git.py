"""`nf1prov catalog` and git: uncommitted hand edits between the markers are refused, a
symlinked README stays a link, and `--commit` commits the catalogue change alone. Real temp
git repositories, a real sqlite MLflow store, the real CLI entry point."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from nf1prov import catalog
from nf1prov.cli import main
from tests.catalog_runs import client_for, experiment, model_run
from tests.conftest import run_git

BEGIN, END = catalog.BEGIN_MARKER, catalog.END_MARKER
README = f"# Project\n\nIntro.\n\n## Model Descriptions\n{BEGIN}\n{END}\n\n## License\nMIT\n"


def nf1prov(capsys, *args: str) -> tuple[int, str, str]:
    """Run the real CLI entry point; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def git_bytes(repo: Path, *args: str) -> bytes:
    """git's output as bytes (CRLF kept)."""
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True).stdout


@pytest.fixture
def client(tracking_uri):
    return client_for(tracking_uri)


@pytest.fixture
def repo(git_repo, tracking_uri, monkeypatch):
    """A repository whose committed README.md has empty markers; the CLI runs inside it."""
    (git_repo / "README.md").write_text(README)
    run_git(git_repo, "add", "README.md")
    run_git(git_repo, "commit", "--quiet", "-m", "Initial")
    monkeypatch.chdir(git_repo)
    return git_repo


def readme_lines(repo: Path) -> list[str]:
    return (repo / "README.md").read_text().splitlines()


def block_of(text: str) -> str:
    return text.split(BEGIN, 1)[1].split(END, 1)[0].lstrip("\r\n")


# --- uncommitted hand edits between the markers -----------------------------------------------


def test_uncommitted_hand_edit_is_refused_until_committed(repo, client, capsys):
    exp = experiment(client)
    model_run(client, exp, "first-fox-1", start_time=1_000)
    assert nf1prov(capsys, "catalog")[0] == 0
    model_run(client, exp, "second-seal-2", start_time=2_000)
    # nf1prov's own uncommitted output is not a hand edit: rebuilding again is fine
    code, out, _ = nf1prov(capsys, "catalog")
    assert code == 0 and "2 models, written" in out

    lines = readme_lines(repo)
    number = lines.index("**Codename:** first-fox-1") + 1
    lines[number - 1] = "**Codename:** first-fox-1 (our best so far, see the paper)"
    edited = "\n".join(lines) + "\n"
    (repo / "README.md").write_text(edited)
    model_run(client, exp, "third-tern-3", start_time=3_000)

    code, _, err = nf1prov(capsys, "catalog")
    assert code == 2
    assert "README.md: the catalogue between the markers was edited by hand" in err
    assert f"(line {number})" in err and "--force" in err
    assert (repo / "README.md").read_text() == edited  # nothing written
    assert nf1prov(capsys, "catalog", "--commit")[0] == 2
    assert run_git(repo, "rev-list", "--count", "HEAD") == "1"  # nothing committed

    # committed, the edit is safe in history: the rebuild goes ahead without --force
    run_git(repo, "commit", "--quiet", "-am", "Our best model")
    code, out, _ = nf1prov(capsys, "catalog")
    assert code == 0 and "3 models, written" in out
    assert "**Codename:** first-fox-1" in readme_lines(repo)
    assert "our best so far" not in (repo / "README.md").read_text()


def test_hand_edits_in_a_never_committed_readme_need_force(git_repo, client, tracking_uri,
                                                           capsys, monkeypatch):
    monkeypatch.chdir(git_repo)
    model_run(client, experiment(client), "first-fox-1")
    text = README.replace(f"{BEGIN}\n", f"{BEGIN}\nA list someone typed.\nSecond line.\n")
    (git_repo / "README.md").write_text(text)
    code, _, err = nf1prov(capsys, "catalog")
    assert code == 2 and "(lines 7-8)" in err
    assert (git_repo / "README.md").read_text() == text
    code, out, _ = nf1prov(capsys, "catalog", "--force")
    assert code == 0 and "written" in out
    assert "someone typed" not in (git_repo / "README.md").read_text()


def test_the_last_block_written_is_kept_in_the_git_dir(repo, client, capsys):
    from nf1prov.catalog import repository as catalog_git

    model_run(client, experiment(client), "first-fox-1")
    assert nf1prov(capsys, "catalog")[0] == 0
    assert catalog_git.state_file(repo).parent == repo / ".git"
    block = block_of((repo / "README.md").read_text())
    assert catalog_git.last_written(repo) == {"README.md": block}
    # only README.md changed in the work tree, even counting ignored files
    assert run_git(repo, "status", "--porcelain", "--ignored") == "M README.md"


# --- a README that is a symlink ---------------------------------------------------------------


def test_a_symlinked_readme_stays_a_link_and_its_target_is_written(repo, client, capsys):
    model_run(client, experiment(client), "first-fox-1")
    (repo / "docs").mkdir()
    run_git(repo, "mv", "README.md", "docs/README.md")
    os.symlink("docs/README.md", repo / "README.md")
    run_git(repo, "add", "README.md")
    run_git(repo, "commit", "--quiet", "-m", "README lives in docs/")

    code, out, _ = nf1prov(capsys, "catalog", "--commit")
    assert code == 0 and "written" in out
    link = repo / "README.md"
    assert link.is_symlink() and os.readlink(link) == "docs/README.md"
    target = (repo / "docs" / "README.md").read_text()
    assert "**Codename:** first-fox-1" in target
    assert sorted(p.name for p in (repo / "docs").iterdir()) == ["README.md"]  # no temp file
    assert run_git(repo, "show", "--name-only", "--format=", "HEAD") == "docs/README.md"
    assert run_git(repo, "status", "--porcelain") == ""


def test_a_readme_link_out_of_the_repository_or_dangling_is_refused(repo, client, capsys,
                                                                     tmp_path):
    """Writing through such a link would change (or create) a file the repository does not
    hold: refused, naming the link and where it points, and nothing is written anywhere."""
    model_run(client, experiment(client), "first-fox-1")
    outside = tmp_path / "outside.md"
    outside.write_text(README)
    link = repo / "README.md"
    link.unlink()
    for target, says in ((outside, "outside the repository"),
                         (tmp_path / "nowhere.md", "does not exist"),
                         (Path("docs/README.md"), "does not exist")):
        if link.is_symlink():
            link.unlink()
        os.symlink(target, link)
        for args in (["catalog"], ["catalog", "--check"]):
            code, out, err = nf1prov(capsys, *args)
            assert code == 2 and f"{link} is a symbolic link to {target}" in err, (out, err)
            assert says in err and "Traceback" not in err
    assert outside.read_text() == README
    assert not (tmp_path / "nowhere.md").exists() and not (repo / "docs").exists()


def test_from_a_subfolder_with_its_own_readme_it_says_which_readme_it_wrote(repo, client,
                                                                            capsys,
                                                                            monkeypatch):
    """A monorepo: the default stays the top README (DESIGN 3.1); from a folder with a README
    of its own, the output names the file written, that README, and how to pick it."""
    model_run(client, experiment(client), "first-fox-1")
    project = repo / "projects" / "seg"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text(README)
    monkeypatch.chdir(project / "src")
    code, out, err = nf1prov(capsys, "catalog")
    assert code == 0 and f"{repo / 'README.md'}: 1 model, written." in out
    assert f"{project / 'README.md'}" in err and "--readme ../README.md" in err
    assert (project / "README.md").read_text() == README
    code, out, err = nf1prov(capsys, "catalog", "--readme", "../README.md")
    assert code == 0 and f"{project / 'README.md'}: 1 model, written." in out and not err
    monkeypatch.chdir(repo)  # at the top: nothing to point out
    assert nf1prov(capsys, "catalog")[2] == ""


# --- --commit: the catalogue change alone -----------------------------------------------------


def changed_lines(diff: str) -> list[str]:
    return [line for line in diff.splitlines()
            if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def test_commit_records_only_the_catalogue_and_keeps_the_users_edits(repo, client, capsys):
    model_run(client, experiment(client), "first-fox-1")
    (repo / "README.md").write_text(README.replace("Intro.", "Intro, rewritten (not ready)."))
    (repo / "staged.txt").write_text("work in progress\n")
    run_git(repo, "add", "staged.txt")

    code, out, _ = nf1prov(capsys, "catalog", "--commit")
    assert code == 0 and "Committed README.md" in out
    assert run_git(repo, "log", "-1", "--format=%s") == "Update model catalogue"
    assert run_git(repo, "show", "--name-only", "--format=", "HEAD") == "README.md"
    committed = run_git(repo, "show", "HEAD:README.md") + "\n"
    block = block_of(committed)
    assert "**Codename:** first-fox-1" in block
    diff = changed_lines(run_git(repo, "show", "--format=", "HEAD"))
    assert diff and all(line.startswith("+") for line in diff)  # the empty block filled in
    assert all(line[1:] in block.splitlines() for line in diff)  # only lines of the block
    assert "Intro." in committed and "rewritten" not in committed

    # the user's edit is still an uncommitted change, and the rest stays staged
    assert changed_lines(run_git(repo, "diff", "--", "README.md")) == [
        "-Intro.", "+Intro, rewritten (not ready)."]
    assert run_git(repo, "diff", "--cached", "--name-only") == "staged.txt"
    assert "rewritten" in (repo / "README.md").read_text()
    assert "**Codename:** first-fox-1" in (repo / "README.md").read_text()


def test_commit_keeps_a_staged_readme_edit_staged(repo, client, capsys):
    model_run(client, experiment(client), "first-fox-1")
    (repo / "README.md").write_text(README.replace("MIT", "Apache-2.0"))
    run_git(repo, "add", "README.md")  # the user staged a license change
    assert nf1prov(capsys, "catalog", "--commit")[0] == 0
    assert "Apache" not in run_git(repo, "show", "HEAD:README.md")
    assert changed_lines(run_git(repo, "diff", "--cached")) == ["-MIT", "+Apache-2.0"]
    assert run_git(repo, "diff") == ""  # the work tree is the staged version


def test_commit_of_a_crlf_readme_keeps_crlf_and_the_users_edit_out(git_repo, client,
                                                                   tracking_uri, capsys,
                                                                   monkeypatch):
    crlf = README.replace("\n", "\r\n")
    (git_repo / "README.md").write_bytes(crlf.encode())
    run_git(git_repo, "add", "README.md")
    run_git(git_repo, "commit", "--quiet", "-m", "Initial")
    monkeypatch.chdir(git_repo)
    model_run(client, experiment(client), "first-fox-1")
    (git_repo / "README.md").write_bytes(crlf.replace("Intro.", "Draft.").encode())
    assert nf1prov(capsys, "catalog", "--commit")[0] == 0
    committed = git_bytes(git_repo, "show", "HEAD:README.md")
    assert committed == (git_repo / "README.md").read_bytes().replace(b"Draft.", b"Intro.")
    assert b"**Codename:** first-fox-1\r\n" in committed
    assert b"\n" not in committed.replace(b"\r\n", b"")
    assert run_git(git_repo, "status", "--porcelain") == "M README.md"


def test_a_refusing_hook_commits_nothing_and_leaves_the_index(repo, client, capsys):
    model_run(client, experiment(client), "first-fox-1")
    hook = repo / ".git" / "hooks" / "pre-commit"
    hook.write_text("#!/bin/sh\necho 'no commits today' >&2\nexit 1\n")
    hook.chmod(0o755)
    index = (repo / ".git" / "index").read_bytes()
    code, _, err = nf1prov(capsys, "catalog", "--commit")
    assert code == 2 and "no commits today" in err
    assert run_git(repo, "rev-list", "--count", "HEAD") == "1"
    assert (repo / ".git" / "index").read_bytes() == index
