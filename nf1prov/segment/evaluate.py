"""Holdout evaluation of a catalogued model: semantic and instance metrics, against a baseline.

Semantic metrics (per class, DESIGN 3.7 names), defined exactly as the training metrics
(`nf1prov.train.metrics`) so that ``holdout_dice_inner-cell`` compares with
``val_dice_inner-cell``. The target is
`nf1prov.data.semantic.instance_to_semantic(mask, boundary_thickness)` with the run's boundary
thickness; a class is predicted where its probability is > 0.5. Pixel counts (TP, FP, FN) are
pooled over every slice of every stack of a patient (and over all patients for the overall row);
then ``dice = 2TP / (2TP + FP + FN)``, ``iou = TP / (TP + FP + FN)``,
``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``; ``<metric>_total`` applies the same
formulas to the counts summed over the three classes (a micro average). A ratio whose
denominator is 0 is 1.0 (nothing predicted and nothing there: no pixel was wrong).

Instance metrics. Objects are matched **slice by slice** (the model is 2-D and a ground-truth
label restricted to one slice is one object there), so a label that spans several slices counts
once per slice. For each pair of a true and a predicted object, the IoU comes from one sparse
contingency table of label pairs (no loop over labels). At a threshold ``t``, a match is a
one-to-one pairing with IoU >= t:

- for ``t > 0.5`` an object can overlap at most one other with IoU > 0.5, so every candidate pair
  is a match and counting them is exact;
- for ``t <= 0.5`` the pairing maximises the number of matches (ties broken by total IoU) with
  `scipy.optimize.linear_sum_assignment`, run only on the objects that have more than one
  candidate (those with exactly one are matched directly).

With ``per_slice=False`` objects are whole labels through the stack, IoU is 3-D (voxels) and
the same matching applies: ``instance3d_*`` scores cells as 3-D objects (the model's labels
made with `PostProcess(dims=3)`, the baseline's by `segment_baseline_3d`).

TP = matches, FP = unmatched predictions, FN = unmatched true objects, pooled like the pixel
counts. ``instance_precision``, ``instance_recall`` and ``instance_f1`` are at IoU 0.5 (a ratio
whose denominator is 0 is 1.0 here too).
``instance_ap`` is the average precision of the cell-segmentation literature (the "average
precision" of Cellpose, the "accuracy" of StarDist): ``AP_t = TP / (TP + FP + FN)``, averaged
over ``t = 0.50, 0.55, ..., 0.95``; ``instance_ap50`` is ``AP_0.5``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nf1prov import tracking
from nf1prov.data.semantic import CLASS_NAMES
from nf1prov.errors import UserError

THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)


# ---------------------------------------------------------------------------------------------
# Instance matching
# ---------------------------------------------------------------------------------------------

def _compact_ids(labels: np.ndarray, per_slice: bool) -> tuple[np.ndarray, int]:
    """Flat int64 ids 1..N of the objects of ``labels`` (0 = background); with ``per_slice``
    and a (Z, H, W) array, one label in two slices gives two objects."""
    labels = np.asarray(labels)
    flat = labels.astype(np.int64, copy=False).ravel()
    foreground = flat > 0
    key = flat[foreground]
    if per_slice and labels.ndim == 3:
        z = np.repeat(np.arange(labels.shape[0], dtype=np.int64), labels[0].size)[foreground]
        key = z * (int(key.max(initial=0)) + 1) + key
    unique, inverse = np.unique(key, return_inverse=True)
    ids = np.zeros(flat.shape, np.int64)
    ids[foreground] = inverse + 1
    return ids, len(unique)


def iou_pairs(true: np.ndarray, pred: np.ndarray, per_slice: bool = True):
    """IoU of every overlapping (true, predicted) object pair.

    ``true``, ``pred``: integer labels of one shape, (H, W) or (Z, H, W), 0 = background.
    Returns (true_index int64 (P,), pred_index int64 (P,), iou float64 (P,), n_true, n_pred),
    indices 0-based over the objects (per slice with ``per_slice``).
    """
    from scipy import sparse

    if np.shape(true) != np.shape(pred):
        raise ValueError(f"label images differ in shape: {np.shape(true)} vs {np.shape(pred)}")
    t, n_true = _compact_ids(true, per_slice)
    p, n_pred = _compact_ids(pred, per_slice)
    area_t = np.bincount(t, minlength=n_true + 1)[1:]
    area_p = np.bincount(p, minlength=n_pred + 1)[1:]
    both = (t > 0) & (p > 0)
    table = sparse.coo_matrix(
        (np.ones(int(both.sum()), np.int64), (t[both] - 1, p[both] - 1)),
        shape=(n_true, n_pred)).tocsr()  # duplicates are summed: intersection areas
    table = table.tocoo()
    ti, pi, inter = table.row.astype(np.int64), table.col.astype(np.int64), table.data
    iou = inter / (area_t[ti] + area_p[pi] - inter)
    return ti, pi, iou.astype(np.float64), n_true, n_pred


def count_matches(ti: np.ndarray, pi: np.ndarray, iou: np.ndarray, threshold: float) -> int:
    """Size of the best one-to-one matching of pairs with IoU >= ``threshold``."""
    from scipy.optimize import linear_sum_assignment

    keep = iou >= threshold
    ti, pi, iou = ti[keep], pi[keep], iou[keep]
    if threshold > 0.5 or len(ti) == 0:
        return int(len(ti))  # IoU > 0.5 pairs are disjoint: each object has at most one
    _, t_inv, t_count = np.unique(ti, return_inverse=True, return_counts=True)
    _, p_inv, p_count = np.unique(pi, return_inverse=True, return_counts=True)
    single = (t_count[t_inv] == 1) & (p_count[p_inv] == 1)
    matched = int(single.sum())
    ti, pi, iou = ti[~single], pi[~single], iou[~single]
    if len(ti) == 0:
        return matched
    rows, r = np.unique(ti, return_inverse=True)
    cols, c = np.unique(pi, return_inverse=True)
    n = min(len(rows), len(cols))
    benefit = np.zeros((len(rows), len(cols)))
    benefit[r, c] = 1.0 + iou / (2 * n)  # any extra match outweighs all IoU tie-breaks
    row_ind, col_ind = linear_sum_assignment(benefit, maximize=True)
    return matched + int((benefit[row_ind, col_ind] > 0).sum())


def instance_counts(true: np.ndarray, pred: np.ndarray,
                    thresholds: Sequence[float] = THRESHOLDS,
                    per_slice: bool = True) -> np.ndarray:
    """int64 (len(thresholds), 3): TP, FP, FN of matching ``pred`` to ``true`` at each IoU
    threshold (see the module docstring)."""
    ti, pi, iou, n_true, n_pred = iou_pairs(true, pred, per_slice)
    tp = np.array([count_matches(ti, pi, iou, t) for t in thresholds], np.int64)
    return np.stack([tp, n_pred - tp, n_true - tp], axis=1)


def _ratio(num, den):
    """num / den, 1.0 where den is 0 (the training metrics' convention)."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


def instance_scores(counts: np.ndarray, thresholds: Sequence[float] = THRESHOLDS) -> dict:
    """Instance metrics from (len(thresholds), 3) TP/FP/FN counts: precision, recall and F1 at
    IoU 0.5, ``ap50`` and ``ap`` (mean of TP / (TP + FP + FN) over the thresholds)."""
    thresholds = np.asarray(thresholds, float)
    at = int(np.argmin(np.abs(thresholds - 0.5)))
    tp, fp, fn = counts[:, 0], counts[:, 1], counts[:, 2]
    ap = _ratio(tp, tp + fp + fn)
    return {
        "instance_precision": float(_ratio(tp[at], tp[at] + fp[at])),
        "instance_recall": float(_ratio(tp[at], tp[at] + fn[at])),
        "instance_f1": float(_ratio(2 * tp[at], 2 * tp[at] + fp[at] + fn[at])),
        "instance_ap50": float(ap[at]),
        "instance_ap": float(np.mean(ap)),
    }


# ---------------------------------------------------------------------------------------------
# Semantic metrics
# ---------------------------------------------------------------------------------------------

def semantic_counts(target: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """int64 (3, 3): per class (rows) TP, FP, FN of ``prob > threshold`` against ``target``.

    ``target``: (3, ...) 0/1 class channels; ``prob``: (3, ...) probabilities, same shape.
    """
    if target.shape != prob.shape:
        raise ValueError(f"target {target.shape} and prob {prob.shape} differ in shape")
    axes = tuple(range(1, target.ndim))
    truth = target.astype(bool)
    predicted = prob > threshold
    tp = np.count_nonzero(truth & predicted, axis=axes)
    fp = np.count_nonzero(~truth & predicted, axis=axes)
    fn = np.count_nonzero(truth & ~predicted, axis=axes)
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def semantic_scores(counts: np.ndarray) -> dict:
    """dice/iou/precision/recall per class and pooled over the classes (``_total``) from (3, 3)
    TP/FP/FN counts."""
    rows = np.vstack([counts, counts.sum(axis=0, keepdims=True)])
    tp, fp, fn = rows[:, 0], rows[:, 1], rows[:, 2]
    per_metric = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
    }
    return {f"{metric}_{name}": float(value)
            for metric, values in per_metric.items()
            for name, value in zip((*CLASS_NAMES, "total"), values, strict=True)}


# ---------------------------------------------------------------------------------------------
# Whole evaluation
# ---------------------------------------------------------------------------------------------

def _no_counts() -> np.ndarray:
    return np.zeros((len(THRESHOLDS), 3), np.int64)


@dataclass
class _Tally:
    semantic: np.ndarray = field(default_factory=lambda: np.zeros((3, 3), np.int64))
    instance: np.ndarray = field(default_factory=_no_counts)
    stacks: int = 0
    instance3d: np.ndarray = field(default_factory=_no_counts)

    def add(self, other: _Tally) -> None:
        self.semantic += other.semantic
        self.instance += other.instance
        self.instance3d += other.instance3d
        self.stacks += other.stacks

    def scores(self) -> dict:
        cells = {name.replace("instance_", "instance3d_"): value
                 for name, value in instance_scores(self.instance3d).items()}
        return {"stacks": self.stacks, **semantic_scores(self.semantic),
                **instance_scores(self.instance), **cells}


def score_stack(mask: np.ndarray, prob: np.ndarray, labels: np.ndarray,
                boundary_thickness: int, cells: np.ndarray | None = None) -> _Tally:
    """Pixel and instance counts of one prediction against its (Z, H, W) instance mask:
    ``labels`` matched slice by slice, ``cells`` (3-D labels; default ``labels``) as 3-D
    objects."""
    from nf1prov.data.semantic import instance_to_semantic

    target = instance_to_semantic(mask, boundary_thickness)
    cells = labels if cells is None else cells
    return _Tally(semantic_counts(target, prob), instance_counts(mask, labels), 1,
                  instance_counts(mask, cells, per_slice=False))


def holdout_fields(data_root: Path, patients: Sequence[str]) -> list:
    """The fields of view of ``patients`` under ``data_root``.

    Every field is discovered and those `layout.is_held_out` assigns to ``patients`` are kept:
    the holdout rule training used ('NF0014' also matches NF0014_T1 ...). The data root may hold
    the holdout patients alone, as labs often keep them.
    """
    from nf1prov.data import layout

    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(f"Data root {data_root} does not exist. Pass --data-root DIR (the folder "
                        "holding the patient folders, e.g. the output of `nf1prov demo-data`).")
    if not patients:
        raise UserError("No holdout patients to evaluate on: the run's data.holdout_patients is "
                        "empty. Name them with --patients NF0014 ...")
    fields = layout.discover_fields(data_root, holdout_patients=())
    chosen = [f for f in fields if layout.is_held_out(f.patient, patients)]
    if not chosen:
        found = sorted({f.patient for f in fields})
        raise UserError(f"No fields of view of patients {', '.join(patients)} under {data_root} "
                        f"(patients found: {', '.join(found) or 'none'}). Pass --patients with "
                        "one of those, or the right --data-root.")
    return chosen


# What each logged evaluation scored (DESIGN 3.7: only holdout patients produce holdout_*).
EVALUATED_PATIENTS, EVALUATED_DATA_ROOT = (tracking.EVALUATED_PATIENTS,
                                           tracking.EVALUATED_DATA_ROOT)


def not_held_out(fields: Sequence, holdout_patients: Sequence[str]) -> list[str]:
    """The patient folders of ``fields`` that the model's ``data.holdout_patients`` do not hold
    out (by the rule training excluded them with), sorted."""
    from nf1prov.data.layout import is_held_out

    return sorted({f.patient for f in fields if not is_held_out(f.patient, holdout_patients)})


def training_splits(splits_tag: str | None) -> dict[str, str]:
    """{patient folder: its split(s), e.g. 'train and val'} from a run's ``nf1prov.data.splits``
    tag; empty when the tag is absent, unreadable or lists counts only."""
    import json

    try:
        summary = json.loads(splits_tag or "{}")
    except ValueError:
        return {}
    if not isinstance(summary, dict):
        return {}
    splits: dict[str, list[str]] = {}  # a patient's fields of view may fall in several splits
    for split, entry in summary.items():
        for patient in entry.get("patients", ()) if isinstance(entry, dict) else ():
            splits.setdefault(patient, []).append(split)
    return {patient: " and ".join(names) for patient, names in splits.items()}


def describe_not_held_out(patients: Sequence[str], splits_tag: str | None) -> str:
    """'NF0016 (train split), NF0099 (not in its training data)': where each patient was in
    the model's training, as far as its ``nf1prov.data.splits`` tag tells."""
    known = training_splits(splits_tag)
    if not known:  # no tag (an older run), or one too long to name the patients
        return ", ".join(patients)
    def where(patient: str) -> str:
        if patient not in known:
            return "not in its training data"
        return f"{known[patient]} split" + ("s" if " and " in known[patient] else "")

    return ", ".join(f"{p} ({where(p)})" for p in patients)


def check_holdout(fields: Sequence, holdout_patients: Sequence[str], splits_tag: str | None,
                  model_label: str) -> str | None:
    """None when every field belongs to a holdout patient of the model, else the sentence
    naming the others and their split (the caller refuses to log, or prints it as a note)."""
    outside = not_held_out(fields, holdout_patients)
    if not outside:
        return None
    held = ", ".join(holdout_patients) or "none"
    plural = "are not holdout patients" if len(outside) > 1 else "is not a holdout patient"
    return (f"{describe_not_held_out(outside, splits_tag)} {plural} of {model_label} (its "
            f"data.holdout_patients: {held})")


def _read_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import tifffile

    try:
        mask = tifffile.imread(path)
    except Exception as exc:
        raise UserError(f"Cannot read the instance mask {path}: {exc}.") from None
    mask = mask.reshape(shape) if mask.size == int(np.prod(shape)) else mask
    if mask.shape != shape:
        raise UserError(f"Instance mask {path} has shape {mask.shape} but its z-stack has "
                        f"{shape}; they must match.")
    return mask


@dataclass
class Evaluation:
    """Per-patient and overall scores (``table``: rows (method, patient), patient 'all' for the
    overall row) and the model it belongs to."""

    table: object  # pandas.DataFrame
    methods: tuple[str, ...]
    overlays: list[Path] = field(default_factory=list)  # PNGs drawn (`save_overlay`)

    def overall(self, method: str = "model") -> dict:
        return self.table.loc[(method, "all")].to_dict()


def evaluate(loaded, fields: Sequence, *, baseline: bool = False, postprocess=None,
             baseline_min_size: int = 10, batch_size: int = 8,
             progress: bool = True, overlays: Path | None = None, postprocess3d=None,
             z_ratio: float | None = None) -> Evaluation:
    """Predict every field of view with ``loaded`` (a `nf1prov.provenance.models.LoadedModel`) and
    score it; with ``baseline`` the classical pipeline is scored on the same stacks.

    ``postprocess``: the model's instance parameters (`nf1prov.segment.instances.PostProcess`;
    default ``loaded.postprocess``), scored per slice; ``postprocess3d``: those of 3-D cells
    (default ``loaded.instance_params(3)``), scored as 3-D objects; ``z_ratio``: z step / xy
    pixel size (default each stack's physical sizes, else the model's setting);
    ``baseline_min_size``: the baseline's smallest object (pixels per slice, voxels in 3-D);
    ``overlays``: a folder to draw each field's outline overlay in (`save_overlay`).
    One field at a time here; `nf1prov.segment.cluster.evaluate_on_cluster` runs
    `evaluate_field` as one Dask task per field and `summarise` adds up either the same way."""
    from tqdm.auto import tqdm

    options = dict(baseline=baseline, postprocess=postprocess,
                   baseline_min_size=baseline_min_size, batch_size=batch_size,
                   overlays=overlays, postprocess3d=postprocess3d, z_ratio=z_ratio)
    scored = (evaluate_field(loaded, fov, **options)
              for fov in tqdm(fields, desc="evaluate", unit="stack", disable=not progress))
    return summarise(fields, scored, baseline)


def evaluate_field(loaded, fov, *, baseline: bool = False, postprocess=None,
                   baseline_min_size: int = 10, batch_size: int = 8,
                   overlays: Path | None = None, postprocess3d=None,
                   z_ratio: float | None = None) -> tuple[dict[str, _Tally], Path | None]:
    """One field of view (`evaluate`'s options): its counts per method ('model', and
    'baseline' with ``baseline``) and its overlay's path when ``overlays`` is given."""
    from nf1prov.segment.baseline import (
        labels_to_probabilities,
        segment_baseline,
        segment_baseline_3d,
    )
    from nf1prov.segment.files import read_stack_and_sizes, stack_z_ratio

    postprocess = postprocess or loaded.postprocess
    postprocess3d = postprocess3d or loaded.instance_params(3)
    thickness = loaded.boundary_thickness
    stack, sizes = read_stack_and_sizes(Path(fov.image_path), loaded.normalisation)
    mask = _read_mask(Path(fov.mask_path), stack.shape)
    ratio = stack_z_ratio(sizes, z_ratio, loaded.z_ratio)
    prob = loaded.predict(stack, batch_size=batch_size)
    flat = postprocess.segment(prob)
    results = {"model": (prob, flat, postprocess3d.cells(prob, ratio, postprocess, flat))}
    if baseline:
        labels = segment_baseline(stack, min_size=baseline_min_size)
        results["baseline"] = (labels_to_probabilities(labels, thickness), labels,
                               segment_baseline_3d(stack, z_ratio=ratio,
                                                   min_size=baseline_min_size))
    tallies = {method: score_stack(mask, p, labels, thickness, cells)
               for method, (p, labels, cells) in results.items()}
    if overlays is None:
        return tallies, None
    found = {method: labels for method, (_, labels, _) in results.items()}
    f1 = {method: tally.scores()["instance_f1"] for method, tally in tallies.items()}
    return tallies, save_overlay(overlays, fov, stack, mask, found, f1, loaded.label)


def summarise(fields: Sequence, scored, baseline: bool) -> Evaluation:
    """The `Evaluation` of ``fields`` from each one's `evaluate_field` result (``scored``, in
    the order of ``fields``): counts pooled per (method, patient) and per method overall."""
    import pandas as pd

    methods = ("model", "baseline") if baseline else ("model",)
    tallies: dict[tuple[str, str], _Tally] = {}
    drawn: list[Path] = []
    for fov, (counts, overlay) in zip(fields, scored, strict=True):
        for method, tally in counts.items():
            for key in ((method, fov.patient), (method, "all")):
                tallies.setdefault(key, _Tally()).add(tally)
        if overlay is not None:
            drawn.append(overlay)
    rows = {key: tally.scores() for key, tally in tallies.items()}
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["method", "patient"])
    patients = sorted({p for _, p in table.index if p != "all"}) + ["all"]
    order = [(m, p) for m in methods for p in patients]
    return Evaluation(table.loc[order], methods, drawn)


def save_overlay(folder: Path, fov, stack: np.ndarray, mask: np.ndarray,
                 labels: dict[str, np.ndarray], f1: dict[str, float], model: str) -> Path:
    """``folder/<patient>_<well>-<site>.png``: on the slice with the most ground-truth cells,
    one panel per method (model, baseline) with its outlines against the mask's, captioned with
    the method's instance F1 on this stack (`nf1prov.segment.pictures.comparison_picture`)."""
    from nf1prov.segment.pictures import comparison_picture

    names = {"model": f"model {model}", "baseline": "baseline (Otsu + distance watershed)"}
    panels = [(f"{names[method]}: instance F1 {f1[method]:.2f} on this stack", found)
              for method, found in labels.items()]
    picture = comparison_picture(stack, mask, panels, name=f"{fov.patient} {fov.well}-{fov.site}",
                                 model=model)
    path = Path(folder) / f"{fov.patient}_{fov.well}-{fov.site}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


SUMMARY_METRICS = (
    [f"dice_{c}" for c in CLASS_NAMES] + ["dice_total"]
    + [f"iou_{c}" for c in CLASS_NAMES] + ["iou_total"]
    + ["instance_precision", "instance_recall", "instance_f1", "instance_ap50", "instance_ap"]
    + ["instance3d_precision", "instance3d_recall", "instance3d_f1", "instance3d_ap50",
       "instance3d_ap"]
)


def format_report(evaluation: Evaluation, title: str) -> str:
    """Text tables: per patient for each method (metrics as rows), and, with a baseline, the
    overall model / baseline / difference."""
    import pandas as pd

    table = evaluation.table
    parts = []
    for method in evaluation.methods:
        sub = table.loc[method, SUMMARY_METRICS].T
        sub.columns = [f"{p} ({int(n)} stack{'s' if n != 1 else ''})"
                       for p, n in zip(sub.columns, table.loc[method, "stacks"], strict=True)]
        parts.append(f"{title} -- {method}, per patient:\n"
                     f"{sub.to_string(float_format=lambda v: f'{v:.4f}')}")
    if "baseline" in evaluation.methods:
        comparison = pd.DataFrame({
            "model": table.loc[("model", "all"), SUMMARY_METRICS],
            "baseline": table.loc[("baseline", "all"), SUMMARY_METRICS],
        })
        comparison["difference"] = comparison["model"] - comparison["baseline"]
        text = comparison.to_string(float_format=lambda v: f"{v:.4f}")
        parts.append("Model against the classical baseline (all holdout stacks; difference = "
                     f"model - baseline):\n{text}")
    return "\n\n".join(parts)


def metrics_to_log(evaluation: Evaluation) -> dict[str, float]:
    """MLflow metric names (DESIGN 3.7) of the overall scores: ``holdout_<metric>_<class>``,
    ``holdout_<metric>_total``, ``holdout_instance_*`` (per slice), ``holdout_instance3d_*``
    (3-D cells); the baseline's as ``holdout_baseline_*``. NaN values are left out."""
    logged = {}
    for method in evaluation.methods:
        prefix = "holdout_" if method == "model" else "holdout_baseline_"
        for name, value in evaluation.overall(method).items():
            if name != "stacks" and value == value:  # NaN != NaN
                logged[prefix + name] = float(value)
    return logged


def evaluated_patients(evaluation: Evaluation) -> list[str]:
    """The patient folders an evaluation scored, sorted."""
    return sorted({patient for _, patient in evaluation.table.index if patient != "all"})


def evaluation_tags(evaluation: Evaluation, data_root: Path) -> dict[str, str]:
    """`EVALUATED_PATIENTS` and `EVALUATED_DATA_ROOT`, whole however many patients (split
    over several tags when long: `tracking.long_tag`; a later evaluation rewrites them)."""
    import json

    from nf1prov import tracking

    patients = json.dumps(evaluated_patients(evaluation))
    return (tracking.long_tag(EVALUATED_PATIENTS, patients, rewritable=True)
            | tracking.long_tag(EVALUATED_DATA_ROOT, str(data_root), rewritable=True))


def log_to_run(client, run_id: str, evaluation: Evaluation, data_root: Path) -> dict[str, float]:
    """Log the overall metrics, ``evaluation/holdout_metrics.csv``, the overlays drawn (under
    ``evaluation/overlays/``) and what was scored (`evaluation_tags`) to an existing run; the
    caller has checked the patients are holdout patients (`check_holdout`).

    MlflowClient logging does not change a FINISHED run's status."""
    import tempfile
    import time

    from mlflow.entities import Metric, RunTag

    metrics = metrics_to_log(evaluation)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in evaluation_tags(evaluation,
                                                                    data_root).items()])
    with tempfile.TemporaryDirectory(prefix="nf1prov-eval-") as tmp:
        path = Path(tmp) / "holdout_metrics.csv"
        evaluation.table.to_csv(path)
        client.log_artifact(run_id, str(path), artifact_path="evaluation")
    for overlay in evaluation.overlays:
        client.log_artifact(run_id, str(overlay), artifact_path="evaluation/overlays")
    return metrics
