"""Builders shared by the catalogue tests (no tests here): real model runs in a real store."""

from __future__ import annotations

import json

from nf1prov import tracking

UPSTREAM_SHA = "07e0368d2d435e4ad04902e242cfee934adc50e0"
UPSTREAM_NOTE = "The binary cross entropy (BCE) was not computed after the first trial (trial 0)"
UPSTREAM_DESCRIPTION = {
    "architecture": "UNet Generator",
    "task": "One-to-One slice segmentation mask prediction",
    "qc": "Does not perform any QC or filtering of images or slices",
    "data": [
        "Trained and evaluated on all patient data except patient NF0014 (Holdout Patient)",
        "The model was developed using multiple segmentation masks:",
        ["Background", "Inner-cell", "Cell-boundary"],
    ],
    "preprocessing": [
        "Each input slice is normalized",
        "Each input is padded to preserve dimensionality (height and width divisible by 16)",
    ],
    "loss": [
        "The BCE loss is modified to account for segmentation mask pixel frequencies",
        ["Computed using an exponential moving average during training by initially randomly "
         "sampling image patches"],
        "The logged BCE used a random alpha exponential moving average hyperparameter",
    ],
}

# The fearless-eel-256 entry of the upstream README, verbatim.
UPSTREAM_ENTRY = """\
**Commit:** `07e0368d2d435e4ad04902e242cfee934adc50e0` <br>
**Codename:** fearless-eel-256

> **Note:** The binary cross entropy (BCE) was not computed after the first trial (trial 0) <br>

- **Architecture:** UNet Generator
- **Task:** One-to-One slice segmentation mask prediction
- **QC / Filtering:** Does not perform any QC or filtering of images or slices
- **Data:**
  - Trained and evaluated on all patient data except patient NF0014 (Holdout Patient)
  - The model was developed using multiple segmentation masks:
    - Background
    - Inner-cell
    - Cell-boundary
- **Preprocessing:**
  - Each input slice is normalized
  - Each input is padded to preserve dimensionality (height and width divisible by 16)
- **Loss:**
  - The BCE loss is modified to account for segmentation mask pixel frequencies
    - Computed using an exponential moving average during training by initially randomly \
sampling image patches
  - The logged BCE used a random alpha exponential moving average hyperparameter
"""


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment(client, name: str = "nf1-segmentation") -> str:
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def model_run(client, exp_id: str, codename: str, *, sha: str = "ab" * 20,
              start_time: int = 1_700_000_000_000, description: dict | None = None,
              notes: list[str] | None = None, status: str | None = "FINISHED",
              extra_tags: dict | None = None, metrics: dict | None = None,
              params: dict | None = None):
    """A model run carrying the DESIGN 3.3 contract tags, created through the real client."""
    from mlflow.entities import Metric, Param, RunTag

    tags = {
        tracking.KIND: tracking.KIND_MODEL,
        tracking.CODENAME: codename,
        tracking.GIT_COMMIT: sha,
        tracking.GIT_TAG: f"model/{codename}",
    }
    for name, value in (description or {}).items():
        tags[tracking.DESCRIPTION_PREFIX + name] = (
            value if isinstance(value, str) else json.dumps(value))
    if notes is not None:
        tags[tracking.NOTES] = json.dumps(notes)
    tags.update(extra_tags or {})
    run = client.create_run(exp_id, start_time=start_time, run_name=codename)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, start_time, 0) for k, v in (metrics or {}).items()],
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    if status is not None:
        client.set_terminated(run.info.run_id, status, end_time=start_time + 60_000)
    return client.get_run(run.info.run_id)
