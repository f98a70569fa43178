"""The file MLflow runs to load an nf1prov model: MLflow 3's "models from code" (DESIGN 3.11).

`nf1prov.segment.mlflow_model.save` copies this file, as it is in the model's commit, into the
MLflow model, beside the model's files under ``artifacts/``: ``weights.pt`` (the state dict),
``architecture.json``, a copy of the architecture's source file, and ``settings.json`` (input
slices, tile size, normalisation, instance parameters, the training images' dtype, the model's
codename, commit and run). ``mlflow.pyfunc.load_model`` runs this file; `Segmenter.load_context`
builds the network from the architecture record (the installed class when its source is the
recorded blob, else the shipped copy, checked against the same blob) and reads the weights with
``torch.load(weights_only=True)``: nothing is unpickled, and a weights file holding code is
refused. It needs nf1prov installed (it predicts with `nf1prov.segment.predict.predict_stack`).

``predict(stack)``: a (Z, H, W) or (H, W) integer image -> float32 (3, Z, H, W) per-class
probabilities (background, inner cell, boundary), what ``nf1prov predict`` writes for the same
stack. Unsigned integer images are normalised by their own dtype, as ``nf1prov predict`` does;
signed integers or plain numbers (a JSON request, a Python list) are read as the training
images' dtype (``settings.json`` ``input_dtype``, e.g. uint16) and must fit in it.
``mlflow.pyfunc.load_model(uri, model_config={"device": "cpu"})`` picks the device (default: a
GPU when there is one, as ``nf1prov predict --device auto``).
"""

import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


class Segmenter(PythonModel):
    """An nf1prov segmentation model behind MLflow's pyfunc interface."""

    def load_context(self, context) -> None:
        from nf1prov import weights
        from nf1prov.devices import pick_device

        files = {name: Path(path) for name, path in context.artifacts.items()}
        self.settings = json.loads(files["settings"].read_text(encoding="utf-8"))
        self.device = pick_device((context.model_config or {}).get("device", "auto"))
        self.model = weights.load(files["weights"].parent, device=self.device,
                                  ref=self.settings.get("codename") or str(files["weights"]),
                                  source=files.get("architecture_source"))

    # np.ndarray: MLflow checks the input against the signature only (no type-hint schema)
    def predict(self, context, model_input: np.ndarray, params=None):
        from nf1prov.errors import UserError
        from nf1prov.segment.predict import predict_stack

        settings = self.settings
        try:
            stack = as_image(model_input, np.dtype(settings["input_dtype"]))
            return predict_stack(self.model, stack, input_slices=settings["input_slices"],
                                 tile_size=settings["tile_size"], device=self.device,
                                 normalisation=settings["normalisation"])
        except (ValueError, UserError) as exc:  # the input's fault: `mlflow models serve` says 400
            raise MlflowException.invalid_parameter_value(str(exc)) from None


def as_image(values, dtype: np.dtype) -> np.ndarray:
    """``values`` as a (Z, H, W) or (H, W) image: unsigned integers and floats as given, other
    numbers (signed integers, a JSON array) converted to ``dtype`` when they fit in it."""
    image = np.asarray(values)
    if image.dtype == object:
        image = np.asarray(image.tolist())
    if image.ndim not in (2, 3):
        raise ValueError(f"An image of shape {image.shape} was given; the model takes a (Z, H, W) "
                         "z-stack or a (H, W) image.")
    if image.dtype.kind in "uf" or image.size == 0:
        return image
    if image.dtype.kind not in "ib":
        raise ValueError(f"An image of dtype {image.dtype} was given; the model takes integers "
                         f"({dtype}, as it was trained).")
    if dtype.kind == "u" and image.dtype.kind == "i":
        low, high = int(image.min()), int(image.max())
        if low < 0 or high > np.iinfo(dtype).max:
            raise ValueError(f"Image values span {low}..{high}, outside the {dtype} range the "
                             f"model was trained on (0..{np.iinfo(dtype).max}).")
    return image.astype(dtype)


mlflow.models.set_model(Segmenter())
