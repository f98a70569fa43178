"""Checks shared by the tests of the pictures nf1prov writes (no tests here): decode a PNG and
look at its title bar and colours."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nf1prov.segment.pictures import BAR_COLOUR


def decode(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a PNG file, decoded by PIL."""
    from PIL import Image

    with Image.open(path) as picture:
        assert picture.format == "PNG"
        return np.asarray(picture.convert("RGB"))


def count(rgb: np.ndarray, colour) -> int:
    """Pixels of exactly ``colour``."""
    return int(np.all(rgb == np.asarray(colour, np.uint8), axis=-1).sum())


def header_rows(rgb: np.ndarray) -> int:
    """Rows from the top that are largely `BAR_COLOUR`: the title, legend and caption bar (text
    covers less than 80 % of a row, an image panel almost none)."""
    bar = np.all(rgb == np.asarray(BAR_COLOUR, np.uint8), axis=-1).mean(axis=1) > 0.2
    return int(np.argmin(bar)) if not bar.all() else len(bar)


def check_header(rgb: np.ndarray, legend_colours) -> np.ndarray:
    """Assert the picture has a bar with text (a title) and a swatch of each legend colour;
    returns the pixels below the bar."""
    rows = header_rows(rgb)
    assert 20 <= rows < rgb.shape[0] // 2, rows
    header = rgb[:rows]
    text = np.any(header != np.asarray(BAR_COLOUR, np.uint8), axis=-1)
    assert text.sum() > 200, "no title or legend drawn"
    for colour in legend_colours:
        assert count(header, colour) >= 25, f"no legend swatch of {colour}"
    return rgb[rows:]
