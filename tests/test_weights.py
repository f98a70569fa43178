"""Weights are data: a state dict read with weights_only=True, and the architecture's code from
the model's own git commit (real repositories, real files, a real remote)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from models.unet import UNet
from nf1prov import weights
from nf1prov.errors import UserError

INSTALLED = Path(__file__).resolve().parents[1] / "models" / "unet.py"
# An earlier version of the architecture: same parameters, a different forward().
OLD_SOURCE = INSTALLED.read_text().replace("        return self.head(x)",
                                           "        return self.head(x) * 0 + 7")


def git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=3, num_classes=3, base_width=4).eval()


def old_model_folder(tmp_path: Path, object_format: str = "sha1") -> tuple[Path, Path]:
    """A repository whose models/unet.py is OLD_SOURCE (committed, tagged model/old-eel-1), and a
    model folder whose record names that source; returns (repo, folder)."""
    assert OLD_SOURCE != INSTALLED.read_text()
    repo = tmp_path / "trainer"
    (repo / "models").mkdir(parents=True)
    (repo / "models" / "unet.py").write_text(OLD_SOURCE)
    git(repo, "init", "-q", "-b", "main", f"--object-format={object_format}")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "old model")
    git(repo, "tag", "model/old-eel-1")
    folder = tmp_path / "model"
    arch = weights.save(tiny(), folder)
    record = json.loads((folder / weights.ARCHITECTURE_FILE).read_text())
    # the blob's SHA-1 (what a SHA-1 repository's `git hash-object` prints)
    record["source_blob"] = weights.blob_hash(OLD_SOURCE.encode())
    if object_format == "sha1":
        assert record["source_blob"] == git(repo, "hash-object", "models/unet.py")
    (folder / weights.ARCHITECTURE_FILE).write_text(json.dumps(record))
    assert arch.source_blob != record["source_blob"]
    return repo, folder


def test_round_trip_with_the_installed_architecture(tmp_path):
    model = tiny()
    arch = weights.save(model, tmp_path / "m")
    assert arch.name == "unet" and arch.args == {"in_channels": 3, "num_classes": 3,
                                                 "base_width": 4}
    assert arch.source_blob == git(tmp_path, "hash-object", str(INSTALLED))
    loaded = weights.load(tmp_path / "m", device="cpu")
    assert type(loaded) is UNet  # the installed class: its source is the recorded blob
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_an_old_model_runs_its_own_forward_from_its_commit(tmp_path):
    repo, folder = old_model_folder(tmp_path)
    loaded = weights.load(folder, repo=repo)
    assert type(loaded) is not UNet
    with torch.no_grad():
        out = loaded(torch.rand(1, 3, 16, 16))
    assert torch.all(out == 7)  # OLD_SOURCE's forward, not the installed one


def test_a_sha256_repository_gives_the_source_by_the_models_commit(tmp_path):
    """Its blobs have other names than the recorded SHA-1: the source is the file in the model's
    commit (tag model/<codename>), checked against the recorded hash; export reads it too."""
    from nf1prov.share import bioimageio

    repo, folder = old_model_folder(tmp_path, object_format="sha256")
    loaded = weights.load(folder, repo=repo, codename="old-eel-1")
    with torch.no_grad():
        assert torch.all(loaded(torch.rand(1, 3, 16, 16)) == 7)
    arch = weights.read_architecture(folder, "old-eel-1")
    sha = git(repo, "rev-parse", "HEAD")
    assert bioimageio.architecture_source(repo, sha, arch) == OLD_SOURCE.encode()


def test_a_clone_without_the_commit_fetches_the_model_tag(tmp_path):
    repo, folder = old_model_folder(tmp_path)
    clone = tmp_path / "collaborator"
    git(tmp_path, "init", "-q", "-b", "main", str(clone))
    git(clone, "remote", "add", "origin", str(repo))
    with pytest.raises(UserError, match=r"neither the installed one nor in the git repository"):
        weights.load(folder, repo=clone)  # no codename: nothing to fetch
    loaded = weights.load(folder, repo=clone, codename="old-eel-1")
    assert git(clone, "rev-parse", "model/old-eel-1") == git(repo, "rev-parse", "HEAD")
    with torch.no_grad():
        assert torch.all(loaded(torch.rand(1, 3, 16, 16)) == 7)


def test_without_the_source_the_error_says_how_to_get_it(tmp_path):
    _, folder = old_model_folder(tmp_path)
    with pytest.raises(UserError) as error:
        weights.load(folder, ref="old-eel-1", repo=None, codename="old-eel-1")
    message = str(error.value)
    assert "models/unet.py" in message and "git fetch origin tag model/old-eel-1" in message


class RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_weights_that_would_run_code_are_refused(tmp_path):
    folder = tmp_path / "m"
    weights.save(tiny(), folder)
    payload = RunsCodeWhenUnpickled()
    payload.marker = str(tmp_path / "pwned")
    torch.save({"stem.0.0.weight": payload}, folder / weights.WEIGHTS_FILE)
    with pytest.raises(UserError, match="Cannot load the weights") as caught:
        weights.load(folder)
    assert not (tmp_path / "pwned").exists()
    # No advice to load it unsafely (torch's weights_only=False or safe_globals): the file is
    # what a tampered store would hold.
    message = str(caught.value)
    assert "weights_only" not in message and "safe_globals" not in message, message
    assert "\n" not in message and str(folder / weights.WEIGHTS_FILE) in message
    assert "not tensors only" in message


def test_a_pickled_module_of_an_earlier_version_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {pytorch: {}}\n")
    with pytest.raises(UserError, match=r"pickled.*nf1prov reproduce tidy-eel-3"):
        weights.load(folder, ref="tidy-eel-3")


@pytest.mark.parametrize("field, value, expected", [
    ("source_blob", "--upload-pack=x", "not a git blob"),
    ("source_path", "../evil.py", "models/ package"),
    ("format", "pickle", "not an nf1prov architecture record"),
])
def test_a_tampered_record_is_refused(tmp_path, field, value, expected):
    folder = tmp_path / "m"
    weights.save(tiny(), folder)
    record = json.loads((folder / weights.ARCHITECTURE_FILE).read_text())
    record[field] = value
    (folder / weights.ARCHITECTURE_FILE).write_text(json.dumps(record))
    with pytest.raises(UserError, match=expected):
        weights.load(folder)
