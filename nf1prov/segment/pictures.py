"""Pictures a user looks at: one colour scheme for every overlay nf1prov draws.

Training overlays, evaluation overlays, `predict --preview`, the bioimage.io cover and the
learning curve all take their colours from here, so a colour means the same thing everywhere.
Green and magenta (classes) and yellow and cyan (outlines) stay apart for the common forms of
colour blindness; where a model's and the ground truth's outlines fall on the same pixel they
add up to white.

Drawing is PIL and numpy only (it runs every epoch and for every predicted file): a picture is
one or more panels side by side under a dark bar holding a title and a legend. Panels smaller
than `MIN_SIDE` pixels are enlarged by a whole factor (nearest neighbour) first, and outlines
are found on the enlarged labels, so they stay thin (one display pixel, two from a factor of
4) instead of growing into blocks on a 64-pixel crop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nf1prov.data.inputs import PERCENTILES
from nf1prov.data.semantic import CLASS_NAMES, boundary_mask

if TYPE_CHECKING:
    from PIL import Image

# RGB, 0-255. Keys are `nf1prov.data.semantic.CLASS_NAMES`.
CLASS_COLOURS = {
    "background": (110, 110, 110),
    "inner-cell": (40, 200, 80),
    "cell-boundary": (230, 40, 200),
}
MODEL_COLOUR = (255, 205, 0)    # the model's cell outlines
TRUTH_COLOUR = (0, 190, 255)    # ground-truth cell outlines
BOTH_COLOUR = (255, 255, 255)   # model and ground-truth outlines on the same pixel


def hex_colour(rgb: tuple[int, int, int]) -> str:
    """'#rrggbb' for matplotlib."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


RGB = tuple[int, int, int]
Legend = Sequence[tuple[RGB, str]]

MIN_SIDE = 256      # panels are enlarged to at least this many pixels on their shorter side,
MAX_SIDE = 2048     # unless that would make their longer side exceed this
IMAGE_DIM = 0.8     # the grey image spans black..80 % white: outlines stand out on bright medium
GAP = 4             # pixels between panels
BAR_COLOUR = (28, 28, 28)
TEXT_COLOUR = (240, 240, 240)


def class_table() -> np.ndarray:
    """float32 (3, 3): row c is the RGB colour of class c of `CLASS_NAMES`."""
    return np.array([CLASS_COLOURS[name] for name in CLASS_NAMES], np.float32)


def class_legend() -> list[tuple[RGB, str]]:
    return [(CLASS_COLOURS[name], name) for name in CLASS_NAMES]


def outline_legend(*, model: str | None = "model", truth: bool = False) -> list[tuple[RGB, str]]:
    """Legend entries of an outline picture: ``model`` names the predicted outlines (None: none
    drawn); ``truth``: ground-truth outlines drawn too (and where both agree)."""
    entries = [(MODEL_COLOUR, model)] if model else []
    if truth:
        entries.append((TRUTH_COLOUR, "ground truth"))
    if model and truth:
        entries.append((BOTH_COLOUR, "both (outlines agree)"))
    return entries


# ---------------------------------------------------------------------------------------------
# Panels: numpy arrays
# ---------------------------------------------------------------------------------------------

def display_factor(height: int, width: int, min_side: int = MIN_SIDE,
                   max_side: int = MAX_SIDE) -> int:
    """Whole enlargement factor >= 1 for a (height, width) panel: its shorter side reaches
    ``min_side`` unless its longer side would pass ``max_side``."""
    grow = -(-min_side // max(1, min(height, width)))
    return max(1, min(grow, max_side // max(1, height, width)))


def enlarge(array: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, ...) array repeated ``factor`` times along H and W (nearest neighbour)."""
    if factor == 1:
        return array
    return np.repeat(np.repeat(array, factor, axis=0), factor, axis=1)


def grey(image: np.ndarray, dim: float = 1.0) -> np.ndarray:
    """The image slice contrast-stretched as the `percentile` normalisation does.

    Parameters
    ----------
    image : (H, W) real array
    dim : float
        Brightest value as a fraction of white.

    Returns
    -------
    (H, W, 3) uint8 array: the 1st percentile black, the 99.8th and above ``dim`` x 255.
    """
    image = np.asarray(image, np.float32)
    low, high = np.percentile(image, PERCENTILES)
    scaled = np.clip((image - low) / (high - low if high > low else 1), 0, 1) * (255 * dim)
    return np.repeat(scaled.round().astype(np.uint8)[..., None], 3, axis=2)


def class_picture(classes: np.ndarray) -> np.ndarray:
    """Classes in `CLASS_COLOURS`.

    Parameters
    ----------
    classes : (H, W) integer array of class indices, or (3, H, W) float array in [0, 1]
        A class map, or per-class probabilities (or a one-hot target): each pixel is then the
        probability-weighted sum of the class colours, divided by the probabilities' sum when
        that is above 1, so a pixel that no class claims is dark.

    Returns
    -------
    (H, W, 3) uint8 array
    """
    classes = np.asarray(classes)
    table = class_table()
    if classes.ndim == 2:
        return table.astype(np.uint8)[classes]
    weights = np.moveaxis(classes.astype(np.float32), 0, -1)  # (H, W, 3)
    mixed = weights @ table / np.maximum(weights.sum(axis=-1, keepdims=True), 1)
    return np.clip(mixed, 0, 255).round().astype(np.uint8)


def outline_overlay(image: np.ndarray, model: np.ndarray | None = None,
                    truth: np.ndarray | None = None, factor: int = 1) -> np.ndarray:
    """Cell outlines over the grey image.

    Parameters
    ----------
    image : (H, W) real array
        The image slice, contrast-stretched and dimmed (`grey`, `IMAGE_DIM`).
    model, truth : (H, W) integer arrays, optional
        Instance labels (0 = background) of the prediction and of the ground truth.
    factor : int
        Enlargement (`display_factor`); outlines are found on the enlarged labels.

    Returns
    -------
    (factor H, factor W, 3) uint8 array: the inner boundary of every labelled object (its pixels
    with a 4-neighbour of another label or background; `nf1prov.data.semantic.boundary_mask`,
    one display pixel thick, two from a factor of 4) in `TRUTH_COLOUR` and `MODEL_COLOUR`,
    `BOTH_COLOUR` where they coincide.
    """
    rgb = enlarge(grey(image, IMAGE_DIM), factor)
    thickness = 2 if factor >= 4 else 1
    lines = {colour: boundary_mask(enlarge(np.asarray(labels), factor), thickness)
             for colour, labels in ((TRUTH_COLOUR, truth), (MODEL_COLOUR, model))
             if labels is not None}
    for colour, mask in lines.items():
        rgb[mask] = colour
    if len(lines) == 2:
        rgb[lines[TRUTH_COLOUR] & lines[MODEL_COLOUR]] = BOTH_COLOUR
    return rgb


def cell_counts(labels: np.ndarray) -> np.ndarray:
    """int64 (Z,): distinct non-zero labels in each slice of (Z, H, W) labels."""
    return np.array([np.unique(plane[plane != 0]).size for plane in np.asarray(labels)],
                    np.int64)


def most_cells_slice(labels: np.ndarray) -> int:
    """The slice of (Z, H, W) (or (H, W): 0) instance labels with the most cells; among equals
    the one nearest the middle of the stack (the likeliest to be in focus)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        return 0
    counts = cell_counts(labels)
    best = np.flatnonzero(counts == counts.max())
    return int(best[np.argmin(np.abs(best - (len(counts) - 1) / 2))])


# ---------------------------------------------------------------------------------------------
# Pictures: panels, a title and a legend (PIL)
# ---------------------------------------------------------------------------------------------

def _font(width: int):
    from PIL import ImageFont

    return ImageFont.load_default(size=int(np.clip(width // 40, 13, 32)))


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` in lines no wider than ``width`` pixels, broken at spaces, and a word longer
    than a line (a path) wherever it must."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
            continue
        lines.append("")
        for char in word:
            if lines[-1] and draw.textlength(lines[-1] + char, font=font) > width:
                lines.append("")
            lines[-1] += char
    return lines or [""]


def _legend_rows(draw, legend: Legend, font, width: int, swatch: int) -> list[list]:
    """Legend entries as rows of (x offset, colour, label) that fit ``width`` pixels."""
    rows: list[list] = [[]]
    x = 0
    for colour, label in legend:
        need = swatch + swatch // 2 + int(draw.textlength(label, font=font))
        if rows[-1] and x + need > width:
            rows.append([])
            x = 0
        rows[-1].append((x, colour, label))
        x += need + 2 * swatch
    return rows


def compose(panels: Sequence[tuple[np.ndarray, str]], title: str, legend: Legend) -> Image.Image:
    """Panels side by side, each under its caption, below a bar with the title and legend.

    Parameters
    ----------
    panels : sequence of ((h, w_i, 3) uint8 array, caption)
        Panels of one height (already enlarged).
    title : str
        Wrapped at spaces to the picture's width.
    legend : sequence of ((r, g, b), label)
        A colour swatch and its label each, wrapped into rows.

    Returns
    -------
    PIL.Image.Image (RGB), ``sum(w_i) + GAP * (len(panels) - 1)`` pixels wide.
    """
    from PIL import Image, ImageDraw

    width = sum(p.shape[1] for p, _ in panels) + GAP * (len(panels) - 1)
    font = _font(width)
    line = int(font.size * 1.35)
    pad = max(GAP, font.size // 2)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines = _wrap(draw, title, font, width - 2 * pad)
    swatch = font.size
    legend_rows = _legend_rows(draw, legend, font, width - 2 * pad, swatch) if legend else []
    captions = [_wrap(draw, caption, font, p.shape[1] - 2 * pad) if caption else []
                for p, caption in panels]
    caption_height = max(map(len, captions)) * line
    bar = pad + (len(title_lines) + len(legend_rows)) * line + pad
    height = bar + caption_height + panels[0][0].shape[0]
    picture = Image.new("RGB", (width, height), BAR_COLOUR)
    draw = ImageDraw.Draw(picture)
    y = pad
    for text in title_lines:
        draw.text((pad, y), text, font=font, fill=TEXT_COLOUR)
        y += line
    for row in legend_rows:
        for x, colour, label in row:
            top = y + (line - swatch) // 2
            draw.rectangle((pad + x, top, pad + x + swatch - 1, top + swatch - 1),
                           fill=tuple(colour), outline=TEXT_COLOUR)
            draw.text((pad + x + swatch + swatch // 2, y), label, font=font, fill=TEXT_COLOUR)
        y += line
    x = 0
    for (panel, _), caption_lines in zip(panels, captions, strict=True):
        for k, text in enumerate(caption_lines):
            draw.text((x + pad, bar + k * line), text, font=font, fill=TEXT_COLOUR)
        picture.paste(Image.fromarray(panel), (x, bar + caption_height))
        x += panel.shape[1] + GAP
    return picture


def pad_to_aspect(picture: Image.Image, ratio: float) -> Image.Image:
    """``picture`` centred on a `BAR_COLOUR` canvas widened (or heightened) to width/height =
    ``ratio``."""
    from PIL import Image

    width = max(picture.width, round(picture.height * ratio))
    height = max(picture.height, round(width / ratio))
    canvas = Image.new("RGB", (width, height), BAR_COLOUR)
    canvas.paste(picture, ((width - picture.width) // 2, (height - picture.height) // 2))
    return canvas


# ---------------------------------------------------------------------------------------------
# The pictures nf1prov writes
# ---------------------------------------------------------------------------------------------

def slice_title(name: str, z: int, depth: int, model: str) -> str:
    return f"{name} · slice z={z} of {depth} · model {model}"


def _as_stack(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    return array.reshape(-1, *array.shape[-2:])


def preview_picture(stack: np.ndarray, labels: np.ndarray, *, name: str,
                    model: str) -> Image.Image:
    """`predict --preview`: the model's outlines on the slice with the most cells.

    ``stack``: (Z, H, W) or (H, W) image as read; ``labels``: integer instance labels of the
    same shape; ``name``: the input's name; ``model``: the model's label (codename)."""
    stack, labels = _as_stack(stack), _as_stack(labels)
    z = most_cells_slice(labels)
    factor = display_factor(*labels.shape[-2:])
    cells = int(cell_counts(labels[z:z + 1])[0])
    panel = outline_overlay(stack[z], model=labels[z], factor=factor)
    caption = f"{cells} cells in this slice" if cells else "no cells found in this stack"
    return compose([(panel, caption)],
                   slice_title(name, z, len(stack), model),
                   outline_legend(model="model"))


def write_preview(path: Path, stack: np.ndarray, labels: np.ndarray, *, name: str,
                  model: str) -> Path:
    """Write `preview_picture` as a PNG at ``path`` (its folder created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    preview_picture(stack, labels, name=name, model=model).save(path)
    return path


def comparison_picture(stack: np.ndarray, truth: np.ndarray,
                       predictions: Sequence[tuple[str, np.ndarray]], *, name: str,
                       model: str) -> Image.Image:
    """`evaluate`'s overlay: on the slice with the most ground-truth cells, one panel per
    prediction with its outlines and the ground truth's.

    Parameters
    ----------
    stack : (Z, H, W) real array
        The image as read.
    truth : (Z, H, W) integer array
        Ground-truth instance labels.
    predictions : sequence of (caption, (Z, H, W) integer labels)
        E.g. the model's, then the baseline's.
    name, model : str
        The field of view and the model's label, for the title.
    """
    stack, truth = _as_stack(stack), _as_stack(truth)
    z = most_cells_slice(truth)
    factor = display_factor(*truth.shape[-2:])
    panels = [(outline_overlay(stack[z], model=_as_stack(labels)[z], truth=truth[z],
                               factor=factor), caption) for caption, labels in predictions]
    cells = int(cell_counts(truth[z:z + 1])[0])
    title = f"{slice_title(name, z, len(stack), model)} · {cells} true cells"
    return compose(panels, title, outline_legend(model="prediction", truth=True))


def training_picture(image: np.ndarray, target: np.ndarray, prob: np.ndarray, *,
                     title: str) -> Image.Image:
    """A training overlay: input | target | prediction, classes in `CLASS_COLOURS`.

    ``image``: (H, W) float input slice; ``target``: (3, H, W) one-hot classes; ``prob``:
    (3, H, W) float sigmoid probabilities (drawn as a probability-weighted colour mix)."""
    factor = display_factor(*np.shape(image)[-2:])
    panels = [(enlarge(grey(image), factor), "input"),
              (enlarge(class_picture(target), factor), "target"),
              (enlarge(class_picture(prob), factor), "prediction")]
    return compose(panels, title, class_legend())


def cover_picture(image: np.ndarray, prob: np.ndarray, *, title: str,
                  min_side: int = MIN_SIDE) -> Image.Image:
    """The bioimage.io cover: the (h, w) input slice in grey beside the argmax class map of its
    (3, h, w) probabilities, with title and class legend, 2:1 (width:height, as bioimage.io
    asks)."""
    factor = display_factor(*np.shape(image)[-2:], min_side=min_side)
    panels = [(enlarge(grey(image), factor), "input"),
              (enlarge(class_picture(np.argmax(prob, axis=0)), factor), "classes (argmax)")]
    return pad_to_aspect(compose(panels, title, class_legend()), 2.0)
