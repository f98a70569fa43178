"""`nf1prov reproduce`: retrain a model with its own commit's code and its logged config, and
compare the metrics with the original run.

The order keeps a refusal free of side effects:
1. The model is checked out into a temporary worktree (config and split manifest only: the
   weights are not needed); a `--no-commit` run trained on a dirty tree gets its logged diff
   applied there, or is refused when that diff is missing, incomplete or does not apply
   (`scratch_code`), so the base commit alone never stands in for its code. The data is
   hashed against the manifest. A mismatch stops here,
   before any run exists; the worktree is removed. Fields of view the data root has gained
   since are left out: the training gets `--set data.fields=[<the recorded ids>]`, so it trains
   on exactly the recorded fields, with the recorded split (a commit whose code predates
   `data.fields` is refused here instead).
2. A run is created in the original's experiment, tagged `nf1prov.reproduces=<original run ID>`,
   and `nf1prov train --no-commit` runs in the worktree as a subprocess with that run as its
   MLFLOW_RUN_ID, so it trains inside it. The subprocess imports the worktree's `models` (and
   `nf1prov`, when the repository holds it) ahead of the installed ones: the model's code, not
   today's. It uses the original's number of torch threads, which CPU results depend on.
3. The reproduction's split manifest is compared with the original's (field ids and splits),
   then the latest value of every metric the two runs share (holdout_* metrics come from
   `evaluate`, not training, and are skipped) is compared; the table is printed, logged to the
   new run as `reproduction/comparison.csv`, and summarised in `nf1prov.reproduction`; the
   original gets `nf1prov.reproduced` (outcome, run, date), which the catalogue shows.
A run the subprocess leaves RUNNING (killed without a word) is ended FAILED or KILLED here.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from nf1prov import git, tracking
from nf1prov.data.manifest import training_rows
from nf1prov.errors import CheckFailed, Nf1provError, UserError
from nf1prov.provenance import run_tags
from nf1prov.provenance.checkout import checkout_model
from nf1prov.provenance.preflight import CACHE_DIR
from nf1prov.provenance.resolve import ResolvedModel

RESULT = "nf1prov.reproduction"  # "identical" or "differs: ..." on the reproducing run
COMPARISON_ARTIFACT = "reproduction/comparison.csv"
ARTIFACTS = ("config", "manifest")
MANIFEST_ARTIFACT = "manifest/split_manifest.csv"
SKIPPED_PREFIXES = ("holdout_", "system/")


class ReproductionFailed(Nf1provError):
    """The retraining itself failed; its run says why. Exit 1."""

    exit_code = 1


@dataclass
class Reproduction:
    original: ResolvedModel
    run_id: str  # the reproducing run
    comparison: pd.DataFrame  # metric, original, reproduced, difference
    missing: list[str]  # metrics the original has and the reproduction lacks
    split_changes: list[str] = field(default_factory=list)  # fields whose split differs
    extra_fields: list[str] = field(default_factory=list)  # under the data root, left out
    holdout_changes: list[str] = field(default_factory=list)  # holdout files missing/changed

    @property
    def identical(self) -> bool:
        return (not self.missing and not self.split_changes
                and bool((self.comparison["difference"] == 0).all()))

    def max_abs_difference(self) -> float:
        return float(self.comparison["difference"].abs().max()) if len(self.comparison) else 0.0


def recorded_data_root(manifest: pd.DataFrame) -> Path:
    """The data root the original run read: <root>/<patient>/zstack_images/<fov>/<file>."""
    return Path(manifest["image_path"].iloc[0]).parents[3]


def check_data(manifest: pd.DataFrame, data_root: Path, cache_dir: Path) -> None:
    """Refuse data whose files are missing or differ from the original's content hashes."""
    from nf1prov.data.manifest import compare_manifest

    if not data_root.is_dir():
        raise UserError(f"Data folder {data_root} does not exist: pass --data-root DIR pointing "
                        "at this machine's copy of the data the model was trained on.")
    problems = compare_manifest(manifest, data_root, recorded_data_root(manifest), cache_dir)
    if problems:
        shown = "; ".join(problems[:10]) + (f"; and {len(problems) - 10} more"
                                            if len(problems) > 10 else "")
        raise UserError(f"The data under {data_root} is not the data the model was trained on "
                        f"({len(problems)} of {2 * len(manifest)} files): {shown}. Point "
                        "--data-root at the original data (same files, same content).")


def holdout_changes(manifest: pd.DataFrame, data_root: Path, cache_dir: Path) -> list[str]:
    """The holdout patients' files of the manifest (split ``holdout``) that are missing or
    differ under ``data_root``. Training never reads them, so they stop no reproduction; they
    tell whether `evaluate` there would score the stacks the original was scored on."""
    from nf1prov.data.manifest import compare_manifest, holdout_rows

    held = holdout_rows(manifest)
    if held.empty:
        return []
    return compare_manifest(held, data_root, recorded_data_root(manifest), cache_dir)


def code_environment(tree: Path) -> dict[str, str]:
    """An environment whose Python imports the worktree's code ahead of the installed one."""
    env = tracking.child_environment()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def trainer_environment(tree: Path, run_id: str, threads: str | None) -> dict[str, str]:
    """The train subprocess's environment: the worktree's code first, the new run to train in."""
    env = code_environment(tree)
    env["MLFLOW_RUN_ID"] = run_id
    if threads and threads.isdigit():
        env["OMP_NUM_THREADS"] = threads
    return env


def manifest_splits(manifest: pd.DataFrame) -> dict[str, str]:
    """{field-of-view id: split} of a split manifest."""
    return {f"{r.patient}/{r.well}-{r.site}": r.split for r in manifest.itertuples()}


def manifest_ids(manifest: pd.DataFrame) -> list[str]:
    """The field-of-view ids of a split manifest, sorted."""
    return sorted(manifest_splits(manifest))


def extra_fields(manifest: pd.DataFrame, data_root: Path, config_path: Path) -> list[str]:
    """Ids of the fields of view under ``data_root`` (less the logged config's holdout
    patients) that the original did not train on: data added since."""
    from nf1prov.config import SCHEMA
    from nf1prov.data.layout import discover_fields

    data = tomllib.loads(config_path.read_text(encoding="utf-8")).get("data", {})
    holdout = data.get("holdout_patients", SCHEMA["data"]["holdout_patients"])
    recorded = set(manifest_ids(manifest))
    return sorted(f.fov_id for f in discover_fields(data_root, tuple(holdout))
                  if f.fov_id not in recorded)


def code_selects_fields(tree: Path) -> bool:
    """Whether the code the retraining runs (the worktree's nf1prov, else the installed one)
    knows the config key data.fields."""
    probe = ("import sys; from nf1prov.config import SCHEMA; "
             "sys.exit(0 if 'fields' in SCHEMA['data'] else 3)")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=code_environment(tree),
                            capture_output=True, text=True, check=False)
    return result.returncode == 0


def fields_override(model: ResolvedModel, tree: Path, manifest: pd.DataFrame, data_root: Path,
                    extra: list[str], echo: Callable[[str], None]) -> str:
    """``data.fields=[...]`` naming the recorded fields, so the extra ones are left out."""
    recorded = manifest_ids(manifest)
    shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
    if not code_selects_fields(tree):
        raise UserError(
            f"{data_root} holds {len(extra)} field(s) of view that {model.codename} was not "
            f"trained on ({shown}), and the code of its commit {model.sha[:12]} predates the "
            "setting data.fields, so its training would use them too. Point --data-root at a "
            f"copy holding only the {len(recorded)} fields of view of the model's "
            "manifest/split_manifest.csv."
        )
    echo(f"Leaving out {len(extra)} field(s) of view added to {data_root} since training "
         f"({shown}): the reproduction trains on the {len(recorded)} recorded ones only "
         "(data.fields).")
    return f"data.fields={json.dumps(recorded)}"


def compare_splits(original: pd.DataFrame, reproduced: pd.DataFrame) -> list[str]:
    """'<fov id>: <original split> -> <reproduced split>' for every field whose split differs
    (a field only one side has shows as '-'); holdout rows are not part of the training."""
    before = manifest_splits(training_rows(original))
    after = manifest_splits(training_rows(reproduced))
    return [f"{fov}: {before.get(fov, '-')} -> {after.get(fov, '-')}"
            for fov in sorted(before.keys() | after.keys()) if before.get(fov) != after.get(fov)]


def compare_metrics(original: dict[str, float],
                    reproduced: dict[str, float]) -> tuple[pd.DataFrame, list[str]]:
    """(table of the shared metrics, names the reproduction lacks)."""
    names = sorted(k for k in original if not k.startswith(SKIPPED_PREFIXES))
    shared = [k for k in names if k in reproduced]
    table = pd.DataFrame({
        "metric": shared,
        "original": [original[k] for k in shared],
        "reproduced": [reproduced[k] for k in shared],
    })
    table["difference"] = table["reproduced"] - table["original"]
    return table, [k for k in names if k not in reproduced]


def share_cache(root: Path, tree: Path) -> None:
    """Let the worktree reuse the repository's decoded-stack cache (keyed by path, size and
    mtime, so sharing it is safe) instead of decoding every TIFF again."""
    cache = root / CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    (tree / CACHE_DIR).parent.mkdir(parents=True, exist_ok=True)
    (tree / CACHE_DIR).symlink_to(cache.resolve(), target_is_directory=True)


def reproduce(root: Path, client, tracking_uri: str, model: ResolvedModel, *,
              data_root: Path | None = None, overrides: tuple[str, ...] = (),
              worktree: Path | None = None,
              echo: Callable[[str], None] = print) -> Reproduction:
    """Retrain ``model`` from its commit in a worktree (temporary unless ``worktree``)."""
    status = model.run.info.status
    if status != "FINISHED":
        raise UserError(f"Model {model.codename} is {status}, so it has no final metrics to "
                        "reproduce. Reproduce a FINISHED model (`nf1prov list`).")
    tmp = None
    if worktree is None:
        tmp = Path(tempfile.mkdtemp(prefix="nf1prov-reproduce-"))
        worktree = tmp / model.codename
    checked_out = checkout_model(root, client, model, worktree=worktree, roots=ARTIFACTS)
    try:
        return _retrain(root, client, tracking_uri, model, checked_out, data_root, overrides,
                        echo)
    finally:
        if tmp is not None:
            git.remove_worktree(root, checked_out.tree)
            shutil.rmtree(tmp, ignore_errors=True)


def _retrain(root, client, tracking_uri, model, checked_out, data_root, overrides,
             echo) -> Reproduction:
    tree, artifacts = checked_out.tree, checked_out.artifacts
    config = artifacts / "config" / "config.toml"
    manifest_csv = artifacts / "manifest" / "split_manifest.csv"
    for path, what in ((config, "config"), (manifest_csv, "split manifest")):
        if not path.is_file():
            raise UserError(f"Model {model.codename} logged no {what} "
                            f"({path.relative_to(artifacts)}), so it cannot be reproduced.")
    logged = pd.read_csv(manifest_csv, dtype={"well": str, "site": str})
    manifest = training_rows(logged)  # the holdout patients' rows are checked apart
    data_root = Path(data_root).resolve() if data_root else recorded_data_root(logged)
    echo(f"Checking {2 * len(logged)} data files under {data_root} against the original "
         "content hashes...")
    check_data(manifest, data_root, root / CACHE_DIR)
    held_out = holdout_changes(logged, data_root, root / CACHE_DIR)
    if held_out:
        echo(f"Note: {len(held_out)} holdout file(s) differ from the original's ("
             f"{'; '.join(held_out[:5])}): the retraining does not read them, but "
             "`nf1prov evaluate` on this data root would not score the original's holdout "
             "stacks.")
    extra = extra_fields(manifest, data_root, config)
    if extra:  # the user's own --set data.fields=... (later) still wins
        overrides = (fields_override(model, tree, manifest, data_root, extra, echo), *overrides)
    share_cache(root, tree)

    tags = model.run.data.tags
    run = client.create_run(model.experiment_id, tags={tracking.REPRODUCES: model.run_id})
    run_id = run.info.run_id
    command = [sys.executable, "-m", "nf1prov", "train", "--config", str(config),
               "--data-root", str(data_root), "--no-commit", "--tracking-uri", tracking_uri]
    for override in overrides:
        command += ["--set", override]
    code = f"commit {model.sha[:12]}" if checked_out.applied is None else (
        f"commit {model.sha[:12]} plus its logged {len(checked_out.applied)}-file diff (a "
        "--no-commit run's code)")
    echo(f"Retraining {model.codename} at {code} in {tree} (run {run_id})...")
    returncode = None
    try:
        returncode = subprocess.run(
            command, cwd=tree, env=trainer_environment(tree, run_id, tags.get(
                run_tags.ENV_THREADS)), check=False).returncode
    finally:
        _end_if_running(client, run_id, returncode)
    if returncode != 0:
        failure = client.get_run(run_id).data.tags.get(tracking.FAILURE, "see the output above")
        raise ReproductionFailed(f"Retraining {model.codename} failed (exit {returncode}); run "
                                 f"{run_id}: {failure}")

    reproduced = client.get_run(run_id)
    comparison, missing = compare_metrics(model.run.data.metrics, reproduced.data.metrics)
    try:
        new_manifest = pd.read_csv(client.download_artifacts(run_id, MANIFEST_ARTIFACT),
                                   dtype={"well": str, "site": str})
        split_changes = compare_splits(manifest, new_manifest)
    except Exception as exc:  # noqa: BLE001  (MLflow raises several types for a missing file)
        split_changes = [f"(the reproduction logged no readable {MANIFEST_ARTIFACT}: {exc})"]
    result = Reproduction(model, run_id, comparison, missing, split_changes, extra, held_out)
    summary = "identical" if result.identical else (
        f"differs: max |difference| {result.max_abs_difference():.3g}"
        + (f", missing {', '.join(missing)}" if missing else "")
        + (f", split of {len(split_changes)} field(s) of view" if split_changes else ""))
    client.set_tag(run_id, RESULT, summary)
    today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
    client.set_tag(model.run_id, tracking.REPRODUCED, f"{summary} (run {run_id}, {today})")
    run_tags.log_text(client, run_id, comparison.to_csv(index=False), COMPARISON_ARTIFACT)
    return result


def _end_if_running(client, run_id: str, returncode: int | None) -> None:
    """No run is left RUNNING: the subprocess may have died before it could end its run."""
    from nf1prov.provenance.train_flow import end_run

    if client.get_run(run_id).info.status != "RUNNING":
        return
    if returncode is None:  # we were interrupted while waiting (Ctrl-C)
        end_run(client, run_id, "KILLED", "reproduction interrupted")
    else:
        end_run(client, run_id, "FAILED",
                f"training process ended (exit {returncode}) without ending its run")


def format_comparison(result: Reproduction) -> str:
    table = result.comparison.to_string(index=False, float_format=lambda v: f"{v:.6g}")
    lines = [f"Original {result.original.codename} (run {result.original.run_id}) vs "
             f"reproduction (run {result.run_id}):", table]
    if result.missing:
        lines.append(f"Missing from the reproduction: {', '.join(result.missing)}")
    if result.split_changes:
        lines.append(f"Split differs from the original's for {len(result.split_changes)} "
                     f"field(s) of view: {'; '.join(result.split_changes[:10])}")
    if result.extra_fields:
        lines.append(f"Left out: {len(result.extra_fields)} field(s) of view added to the data "
                     "root since training.")
    if result.holdout_changes:
        lines.append(f"Holdout data: {len(result.holdout_changes)} file(s) missing or changed "
                     "since training (not used by training; evaluations would differ).")
    return "\n".join(lines)


def check_identical(result: Reproduction, tolerance: float) -> None:
    """CheckFailed (exit 1) unless every shared metric is within ``tolerance``."""
    worst = result.max_abs_difference()
    if result.missing or result.split_changes or worst > tolerance:
        raise CheckFailed(
            f"The reproduction of {result.original.codename} differs: largest |difference| "
            f"{worst:.3g} (tolerance {tolerance:g})"
            + (f"; missing metrics: {', '.join(result.missing)}" if result.missing else "")
            + (f"; the split of {len(result.split_changes)} field(s) of view differs"
               if result.split_changes else "")
            + ". Differences come from another device or torch version, a nondeterministic "
            "GPU kernel, or data/code outside the commit; `nf1prov show` on both runs compares "
            "their environments.")
