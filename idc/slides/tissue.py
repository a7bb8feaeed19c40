"""Tissue detection: which tiles hold tissue, so that glass is never classified.

At low resolution (`CELLS` mask pixels per tile side), tissue is where saturation (HSV's S) is above
Otsu's threshold of the slide's own saturation histogram; glass and empty slides are grey-white,
hence low saturation. The threshold is kept within [MIN_SATURATION, MAX_SATURATION]: never lower,
so a slide without tissue (Otsu would split its noise in two) is all glass; never higher, so pale
stroma is not cut off where dense purple tissue pulls Otsu up (its histogram has three modes).
Holes inside tissue (fat, lumina: white but surrounded by tissue) are filled, and a tile is
classified when at least `min_tissue` (Slides.min_tissue) of it is tissue.

The bounds and the default min_tissue 0.1 were chosen on 12 training patients' patches pasted on
glass (as ../shared/data/slides were made): 94.4 % of the dataset's patches are kept (the rest are
mostly empty fat and glass at the tissue's edge) and 5 of 24,956 glass tiles (Otsu unbounded:
93.3 % and 3). Pillow and NumPy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CELLS = 8  # mask pixels per tile side
MIN_SATURATION = 20  # of 255: above glass, slide-scanner noise and JPEG chroma noise
MAX_SATURATION = 35  # of 255: pale eosin-stained stroma is above it


@dataclass(frozen=True)
class TissueMask:
    mask: np.ndarray  # bool (H, W) at `scale` level-0 px per pixel
    scale: float
    threshold: int  # the saturation threshold used (0-255)
    image: Image.Image  # the slide at the mask's scale (RGB): the heatmap's background

    def area_share(self) -> float:
        return float(self.mask.mean())


def saturation(image: Image.Image | np.ndarray) -> np.ndarray:
    """HSV's S (0-255) of each pixel of an image or an RGB array."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image[..., :3], dtype=np.int16)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    return np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0).astype(np.uint8)


def tissue_pixels(rgb: np.ndarray) -> np.ndarray:
    """Which pixels of an RGB array are tissue, not glass or fat, by the saturation rule (a patch's or
    a tile's, where the slide's own Otsu threshold is not known: its lower bound, MIN_SATURATION)."""
    return saturation(rgb) >= MIN_SATURATION


def otsu(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the level that best separates two classes (>= is above)."""
    histogram = np.bincount(values.ravel(), minlength=256).astype(float)
    levels = np.arange(256)
    weight_low = np.cumsum(histogram)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(histogram * levels)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between)) + 1


def tissue_mask(reader) -> TissueMask:
    """The tissue of a SlideReader's slide, at CELLS mask pixels per tile side."""
    scale = reader.tile_size / CELLS
    return mask_of(reader.region_at_scale(scale), scale)


def mask_of(image: Image.Image, scale: float) -> TissueMask:
    """The tissue of a low-resolution image of a slide (`scale` level-0 px per pixel)."""
    s = saturation(image.filter(ImageFilter.MedianFilter(3)))
    threshold = min(max(otsu(s), MIN_SATURATION), MAX_SATURATION)
    mask = Image.fromarray(((s >= threshold) * 255).astype(np.uint8))
    mask = mask.filter(ImageFilter.MaxFilter(3)).filter(ImageFilter.MinFilter(3))  # close small gaps
    return TissueMask(_fill_holes(np.asarray(mask) > 0), scale, threshold, image)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Glass is what the slide's border reaches without crossing tissue; everything else is tissue."""
    # copy(): an image made by fromarray may share the array's read-only buffer, which floodfill cannot write
    padded = Image.fromarray(np.pad(mask, 1).astype(np.uint8) * 255).copy()
    ImageDraw.floodfill(padded, (0, 0), 128)
    return (np.asarray(padded) != 128)[1:-1, 1:-1]


def tile_shares(reader, tissue: TissueMask) -> np.ndarray:
    """The tissue share of every tile of the reader's grid: (rows, columns), each in [0, 1]."""
    mask = tissue.mask.astype(np.float64)
    integral = np.pad(mask.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    height, width = mask.shape

    def edges(origin: int, count: int, limit: int) -> np.ndarray:
        return np.clip(np.rint((origin + np.arange(count + 1) * reader.tile_size) / tissue.scale), 0, limit
                       ).astype(int)

    xs, ys = edges(reader.origin[0], reader.columns, width), edges(reader.origin[1], reader.rows, height)
    x0, x1, y0, y1 = xs[:-1][None, :], xs[1:][None, :], ys[:-1][:, None], ys[1:][:, None]
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / np.maximum((x1 - x0) * (y1 - y0), 1)
