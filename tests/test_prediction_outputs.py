"""What `nf1prov predict` outputs keep: the input's physical pixel sizes, the model that made
them (OME-XML and the `<stem>_nf1prov.json` sidecar, written last), and how napari opens them
(the npe2 reader, through npe2's own API, no display). Tiny untrained models, CPU."""

from __future__ import annotations

import hashlib
import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from nf1prov.cli import cli
from tests.test_inference import save_local_model, smooth_stack

OME_SIZES = {"PhysicalSizeX": 0.65, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.65,
             "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 2.0, "PhysicalSizeZUnit": "µm"}
OUTPUTS = ("probabilities.ome.tif", "classes.ome.tif", "labels.ome.tif")
OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def predict(*args):
    result = CliRunner().invoke(cli, ["predict", *map(str, args), "--no-progress"])
    return result


def ome_pixels(path):
    """The OME Pixels element of a file as a dict (tifffile's reading of its OME-XML)."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome, path
        image = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    return image["Pixels"]


def sizes_of(path):
    return {k: v for k, v in ome_pixels(path).items() if k.startswith("PhysicalSize")}


def sidecar(folder, stem="scan"):
    return json.loads((folder / f"{stem}_nf1prov.json").read_text(encoding="utf-8"))


def test_ome_input_sizes_reach_every_output_and_probabilities_are_float32_ome(tmp_path):
    model_dir, _ = save_local_model(tmp_path)
    scan = tmp_path / "scan.ome.tif"
    tifffile.imwrite(scan, smooth_stack((3, 40, 50)), ome=True,
                     metadata={"axes": "ZYX", **OME_SIZES})
    out = tmp_path / "out"
    result = predict(model_dir, scan, "-o", out)
    assert result.exit_code == 0, result.output
    for ending in OUTPUTS:  # float32 OME-TIFF probabilities by default (Fiji cannot read float16)
        assert sizes_of(out / f"scan_{ending}") == OME_SIZES, ending
    with tifffile.TiffFile(out / "scan_probabilities.ome.tif") as tif:
        assert tif.series[0].dtype == np.float32 and tif.series[0].axes == "CZYX"
        # ImageJ's own TIFF opener reads the resolution tags: pixels per centimetre
        page = tif.pages[0]
        assert page.resolutionunit == tifffile.RESUNIT.CENTIMETER
        np.testing.assert_allclose(page.resolution, (1e4 / 0.65, 1e4 / 0.65), rtol=1e-6)
    assert not (out / "scan_probabilities.tif").exists()
    assert sidecar(out)["physical_sizes"] == OME_SIZES
    # cells in 3-D, at the z ratio the sizes give (z step 2 um over 0.65 um pixels)
    made = sidecar(out)["instances"]
    assert made["dims"] == 3 and made["z_ratio"] == pytest.approx(2.0 / 0.65)

    # float16 on request: a shaped TIFF (OME-XML has no half float) whose metadata holds them
    half = tmp_path / "half"
    assert predict(model_dir, scan, "-o", half, "--probabilities-dtype", "float16").exit_code == 0
    with tifffile.TiffFile(half / "scan_probabilities.tif") as tif:
        assert tif.series[0].dtype == np.float16 and tif.series[0].axes == "CZYX"
        shaped = tif.shaped_metadata[0]
    assert {k: shaped[k] for k in OME_SIZES} == OME_SIZES


def test_imagej_hyperstack_spacing_and_resolution_are_kept(tmp_path):
    model_dir, _ = save_local_model(tmp_path)
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, smooth_stack((3, 32, 40)), imagej=True, resolution=(2.0, 2.0),
                     metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"})
    out = tmp_path / "out"
    assert predict(model_dir, scan, "-o", out).exit_code == 0
    expected = {"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": 0.5,
                "PhysicalSizeYUnit": "µm", "PhysicalSizeZ": 1.5, "PhysicalSizeZUnit": "µm"}
    for ending in OUTPUTS:
        assert sizes_of(out / f"scan_{ending}") == expected, ending
    assert sidecar(out)["instances"]["z_ratio"] == pytest.approx(3.0)  # 1.5 um over 0.5 um


def test_an_input_without_sizes_gets_none_invented(tmp_path):
    model_dir, _ = save_local_model(tmp_path)
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, smooth_stack((2, 32, 32)))  # plain TIFF: no OME, no ImageJ, no unit
    out = tmp_path / "out"
    assert predict(model_dir, scan, "-o", out).exit_code == 0
    for ending in OUTPUTS:
        assert sizes_of(out / f"scan_{ending}") == {}, ending
        with tifffile.TiffFile(out / f"scan_{ending}") as tif:
            assert tif.pages[0].resolutionunit != tifffile.RESUNIT.CENTIMETER
    assert sidecar(out)["physical_sizes"] == {}
    assert sidecar(out)["instances"]["z_ratio"] == 1.0  # the model's postprocess.z_ratio
    # --z-ratio says what the file does not; --instances 2d labels each slice on its own
    assert predict(model_dir, scan, "-o", out, "--z-ratio", "2.5").exit_code == 0
    assert sidecar(out)["instances"]["z_ratio"] == 2.5
    assert predict(model_dir, scan, "-o", out, "--instances", "2d").exit_code == 0
    assert sidecar(out)["instances"]["dims"] == 2 and "z_ratio" not in sidecar(out)["instances"]


def test_outputs_and_sidecar_name_the_model(tracking_uri, tmp_path):
    from tests.test_evaluate import log_tiny_model

    run_id = log_tiny_model()
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, smooth_stack((3, 32, 32)))
    out = tmp_path / "out"
    result = predict("tiny-eel-1", scan, "-o", out, "--min-size", "7")
    assert result.exit_code == 0, result.output
    expected = {"codename": "tiny-eel-1", "commit": "0" * 40, "run_id": run_id,
                "instances3d.min_size": "7", "instances3d.z_ratio": "1"}  # cells in 3-D
    for ending in OUTPUTS:
        with tifffile.TiffFile(out / f"scan_{ending}") as tif:
            ome = ElementTree.fromstring(tif.ome_metadata)
        assert ome.get("Creator").startswith("nf1prov "), ending
        [annotation] = ome.iter(f"{OME}MapAnnotation")
        assert annotation.get("Namespace") == "nf1prov/model"
        values = {m.get("K"): m.text for m in annotation.iter(f"{OME}M")}
        assert expected.items() <= values.items(), (ending, values)
        [ref] = ome.find(f"{OME}Image").iter(f"{OME}AnnotationRef")  # linked to the image
        assert ref.get("ID") == annotation.get("ID")
    record = sidecar(out)
    assert (record["codename"], record["commit"], record["run_id"]) == ("tiny-eel-1", "0" * 40,
                                                                         run_id)
    assert record["instances"]["min_size"] == 7 and record["instances"]["dims"] == 3
    assert record["input"] == str(scan.resolve())
    assert record["input_sha256"] == hashlib.sha256(scan.read_bytes()).hexdigest()
    assert record["outputs"] == {"probabilities": "scan_probabilities.ome.tif",
                                 "classes": "scan_classes.ome.tif",
                                 "labels": "scan_labels.ome.tif"}
    assert record["n_cells"] == int(tifffile.imread(out / "scan_labels.ome.tif").max())
    assert record["nf1prov_version"] and record["written"].endswith("Z")


def test_the_sidecar_comes_last_and_only_for_a_finished_stack(tmp_path):
    model_dir, _ = save_local_model(tmp_path)
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, smooth_stack((2, 32, 32)))
    out = tmp_path / "out"
    assert predict(model_dir, scan, "-o", out).exit_code == 0
    done = out / "scan_nf1prov.json"
    outputs = [out / f"scan_{ending}" for ending in OUTPUTS]
    assert all(done.stat().st_mtime_ns >= p.stat().st_mtime_ns for p in outputs)
    assert sorted(p.name for p in out.iterdir()) == sorted([done.name, *(p.name for p in outputs)])
    # A rerun that fails half-way (the labels cannot be written) leaves no sidecar claiming the
    # stack is done, not even the first run's.
    outputs[2].unlink()
    outputs[2].mkdir()
    assert predict(model_dir, scan, "-o", out).exit_code != 0
    assert not done.exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    outputs[2].rmdir()
    assert predict(model_dir, scan, "-o", out).exit_code == 0
    assert sidecar(out)["outputs"]["labels"] == outputs[2].name


def test_checked_out_model_folder_knows_its_run(tmp_path):
    """A folder `nf1prov checkout` leaves has run.json beside model/: the outputs name the run."""
    model_dir, _ = save_local_model(tmp_path)
    (model_dir.parent / "run.json").write_text(json.dumps(
        {"codename": "calm-cat-1", "run_id": "r" * 32, "commit": "a" * 40,
         "experiment_id": "1"}))
    scan = tmp_path / "scan.tif"
    tifffile.imwrite(scan, smooth_stack((1, 32, 32)))
    out = tmp_path / "out"
    assert predict(model_dir, scan, "-o", out).exit_code == 0
    record = sidecar(out)
    assert (record["codename"], record["run_id"], record["commit"]) == ("calm-cat-1", "r" * 32,
                                                                         "a" * 40)
    assert record["model"] == str(model_dir.resolve())


# --- napari ----------------------------------------------------------------------------------

def write_outputs_of(folder, dtype):
    from nf1prov.segment.files import write_outputs

    rng = np.random.default_rng(0)
    prob = rng.random((3, 2, 24, 30)).astype(np.float32)
    prob /= prob.sum(axis=0)
    labels = np.zeros((2, 24, 30), np.uint16)
    labels[:, 4:12, 5:15], labels[1, 14:20, 18:28] = 1, 2
    files = write_outputs(folder, "x", prob, labels, dtype, sizes=OME_SIZES,
                          model={"codename": "tiny-eel-1", "run_id": "abc"})
    return files, prob, labels


@pytest.fixture(scope="module")
def napari_plugins():
    """npe2's plugin manager with the installed nf1prov's manifest (its napari.manifest entry
    point), as napari finds it."""
    import npe2

    manager = npe2.PluginManager.instance()
    manager.discover()
    assert "nf1prov" in {m.name for m in manager.iter_manifests()}
    return npe2


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_napari_opens_labels_as_labels_and_probabilities_as_images_with_scale(
        tmp_path, napari_plugins, dtype):
    files, prob, labels = write_outputs_of(tmp_path, dtype)
    scale = (2.0, 0.65, 0.65)

    def read(path):
        return napari_plugins.read([str(path)], stack=False, plugin_name="nf1prov")

    [(data, meta, kind)] = read(files.labels)
    assert kind == "labels" and tuple(meta["scale"]) == scale
    np.testing.assert_array_equal(np.asarray(data), labels)
    assert meta["metadata"]["codename"] == "tiny-eel-1" and meta["name"] == "x labels"

    [(data, meta, kind)] = read(files.probabilities)
    assert kind == "image" and meta["channel_axis"] == 0 and tuple(meta["scale"]) == scale
    assert meta["name"] == ["x background", "x inner-cell", "x cell-boundary"]
    assert np.asarray(data).shape == prob.shape
    np.testing.assert_allclose(np.asarray(data, np.float32), prob, atol=1e-3)

    [(data, meta, kind)] = read(files.classes)
    assert kind == "labels" and tuple(meta["scale"]) == scale
    np.testing.assert_array_equal(np.asarray(data), np.argmax(prob, axis=0))


def test_napari_opens_a_sidecar_as_the_input_under_its_outputs_at_one_scale(
        tmp_path, napari_plugins):
    from nf1prov.segment.files import sidecar_path, write_sidecar
    from nf1prov.segment.instances import PostProcess

    files, _, labels = write_outputs_of(tmp_path, "float32")
    scan = tmp_path / "x.tif"
    tifffile.imwrite(scan, smooth_stack((2, 24, 30)))
    write_sidecar(sidecar_path(tmp_path, "x"), files, scan, OME_SIZES, {}, PostProcess())
    layers = napari_plugins.read([str(sidecar_path(tmp_path, "x"))], stack=False,
                                 plugin_name="nf1prov")
    assert [(meta.get("name"), kind) for _, meta, kind in layers] == [
        ("x input", "image"), (["x background", "x inner-cell", "x cell-boundary"], "image"),
        ("x classes", "labels"), ("x labels", "labels")]
    assert {tuple(meta["scale"]) for _, meta, _ in layers} == {(2.0, 0.65, 0.65)}
    np.testing.assert_array_equal(layers[0][0], tifffile.imread(scan))
    np.testing.assert_array_equal(layers[-1][0], labels)
    assert "visible" not in layers[-1][1] and layers[2][1]["visible"] is False


def test_napari_reader_leaves_other_files_to_other_readers(tmp_path):
    from nf1prov.segment.napari_reader import get_reader

    tifffile.imwrite(tmp_path / "scan.tif", np.zeros((4, 4), np.uint8))
    assert get_reader(str(tmp_path / "scan.tif")) is None
    assert get_reader([str(tmp_path / "a_labels.ome.tif"), str(tmp_path / "scan.tif")]) is None
