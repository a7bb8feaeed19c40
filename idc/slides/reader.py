"""A whole-slide image read at the model's scale (OpenSlide: Aperio .svs, Hamamatsu .ndpi, generic
tiled TIFF, MIRAX, ...).

The model was trained on patches of `patch_pixels` px at `model_mpp` microns per pixel (the IDC
dataset: 50 px at about 4 um/px, 200 um a side). A tile of the slide covers the same 200 um: it is
read from the pyramid level nearest that scale but not coarser, and resampled to the model's
pixels by area averaging (as a scanner's own pyramid is made), so a slide scanned at 0.25, 0.5 or
4 um/px gives the same tiles. Tiles lie on a grid from `origin` (level-0 pixels) in steps of one
tile; tile (column, row) is at origin + (column, row) * tile size.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from idc.core.errors import SlideError

log = logging.getLogger(__name__)

# What OpenSlide reads (its documentation's list); a .tif/.tiff may also be a plain image.
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".dcm", ".czi")
GLASS = (255, 255, 255)  # what OpenSlide's transparent pixels (outside the scanned area) become


def is_slide(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SLIDE_SUFFIXES


@dataclass(frozen=True)
class Tile:
    column: int
    row: int
    x: int  # level-0 pixels of its top-left corner
    y: int
    size: int  # level-0 pixels a side (rounded)


class SlideReader:
    """One slide, cut into the model's tiles. `mpp`: the microns per pixel of its level 0, used when
    the file does not say (openslide.mpp-x); a file that says wins."""

    def __init__(self, path: str | Path, model_mpp: float, patch_pixels: int, mpp: float | None = None,
                 origin: tuple[int, int] = (0, 0)):
        import openslide

        self.path = Path(path)
        if not self.path.is_file():
            raise SlideError(f"no slide at {self.path}")
        try:
            self.slide = openslide.OpenSlide(str(self.path))
        except (openslide.OpenSlideError, OSError) as err:  # OpenSlideUnsupportedFormatError is an OpenSlideError
            raise SlideError(f"{self.path.name} is not a slide OpenSlide can read ({type(err).__name__}: "
                             f"{str(err)[:200]}); formats: Aperio .svs, Hamamatsu .ndpi, generic tiled TIFF, "
                             "MIRAX .mrxs, Leica .scn, Ventana .bif, Philips TIFF, DICOM") from None
        self._openslide_error = openslide.OpenSlideError
        try:
            self._set_grid(model_mpp, patch_pixels, mpp, origin)
        except SlideError:
            self.slide.close()
            raise

    def _set_grid(self, model_mpp: float, patch_pixels: int, mpp: float | None, origin: tuple[int, int]) -> None:
        self.mpp, self.mpp_source = self._scale(mpp)
        self.model_mpp, self.patch_pixels = float(model_mpp), int(patch_pixels)
        self.width, self.height = self.slide.dimensions
        self.tile_size = self.patch_pixels * self.model_mpp / self.mpp  # level-0 px a side (float)
        self.level = self._level_for(self.tile_size / self.patch_pixels)
        self.origin = (int(origin[0]), int(origin[1]))
        if not (0 <= self.origin[0] < self.width and 0 <= self.origin[1] < self.height):
            raise SlideError(f"grid origin {self.origin} is outside {self.path.name} "
                             f"({self.width} x {self.height} px)")
        self.columns = int((self.width - self.origin[0]) // self.tile_size)
        self.rows = int((self.height - self.origin[1]) // self.tile_size)
        if not self.columns or not self.rows:
            raise SlideError(f"{self.path.name} ({self.width} x {self.height} px at {self.mpp:g} um/px) is smaller "
                             f"than one tile ({self.tile_size:.0f} px = {self.patch_pixels * self.model_mpp:g} um)")

    def _scale(self, mpp: float | None) -> tuple[float, str]:
        import openslide

        try:
            stated = float(self.slide.properties.get(openslide.PROPERTY_NAME_MPP_X, "nan"))
        except ValueError:
            stated = math.nan
        if math.isfinite(stated) and stated > 0:
            if mpp and abs(mpp - stated) > 1e-6:
                log.warning("%s states %g um/px: using that, not the %g given", self.path.name, stated, mpp)
            return stated, "slide"
        if mpp:
            return float(mpp), "given"
        raise SlideError(f"{self.path.name} does not say its scale ({openslide.PROPERTY_NAME_MPP_X} is absent): "
                         "give the microns per pixel of its level 0 (--mpp 0.5 for a 20x scan, 0.25 for 40x; "
                         "Slides.default_mpp on the server)")

    def _level_for(self, downsample: float) -> int:
        """The coarsest level that is still at least as fine as `downsample` (no detail is invented)."""
        levels = [i for i, d in enumerate(self.slide.level_downsamples) if d <= downsample * 1.001]
        return max(levels, key=lambda i: self.slide.level_downsamples[i]) if levels else 0

    def tile(self, column: int, row: int) -> Tile:
        return Tile(column, row, self.origin[0] + round(column * self.tile_size),
                    self.origin[1] + round(row * self.tile_size), round(self.tile_size))

    def read(self, tiles: list[Tile]) -> list[np.ndarray]:
        """The tiles' pixels at the model's scale: RGB uint8, patch_pixels a side. Tiles of one row that
        touch are read as one region (fewer, larger reads)."""
        images: list[np.ndarray] = []
        start = 0
        while start < len(tiles):
            end = start + 1
            while (end < len(tiles) and tiles[end].row == tiles[start].row
                   and tiles[end].column == tiles[end - 1].column + 1):
                end += 1
            images += self._read_run(tiles[start:end])
            start = end
        return images

    def _read_run(self, run: list[Tile]) -> list[np.ndarray]:
        downsample = self.slide.level_downsamples[self.level]
        first = run[0]
        x_end = self.origin[0] + (run[-1].column + 1) * self.tile_size
        y_end = self.origin[1] + (first.row + 1) * self.tile_size
        width = max(1, round((x_end - first.x) / downsample))
        height = max(1, round((y_end - first.y) / downsample))
        rgb = self._region((first.x, first.y), self.level, (width, height))
        side = self.patch_pixels
        strip = np.asarray(rgb.resize((side * len(run), side), Image.BOX))
        return [strip[:, i * side:(i + 1) * side] for i in range(len(run))]

    def thumbnail(self, max_side: int) -> Image.Image:
        """The slide as an RGB image at most `max_side` px a side (glass white)."""
        return self.region_at_scale(max(self.width, self.height) / max_side)

    def region_at_scale(self, scale: float, band: int = 64) -> Image.Image:
        """The whole slide as RGB at `scale` level-0 px per output px (for the tissue mask), read in
        bands of `band` output rows: memory stays bounded however large the level read is."""
        width, height = max(1, round(self.width / scale)), max(1, round(self.height / scale))
        level = self._level_for(scale)
        downsample = self.slide.level_downsamples[level]
        level_width = self.slide.level_dimensions[level][0]
        out = Image.new("RGB", (width, height), GLASS)
        for top in range(0, height, band):
            rows = min(band, height - top)
            y0 = round(top * scale)
            region = self._region((0, y0), level, (level_width, max(1, round(rows * scale / downsample))))
            out.paste(region.resize((width, rows), Image.BOX), (0, top))
        return out

    def _region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        """read_region as RGB, transparent pixels (outside the scanned area) as glass."""
        try:
            region = self.slide.read_region(location, level, size)
        except self._openslide_error as err:
            raise SlideError(f"{self.path.name} cannot be read at {location} (truncated or corrupt?): "
                             f"{str(err)[:200]}") from None
        rgb = Image.new("RGB", region.size, GLASS)
        rgb.paste(region, mask=region.getchannel("A"))
        return rgb

    def describe(self) -> dict:
        level_mpp = self.mpp * self.slide.level_downsamples[self.level]
        return {"file": self.path.name, "width": self.width, "height": self.height, "mpp": self.mpp,
                "mpp_source": self.mpp_source, "vendor": self.slide.properties.get("openslide.vendor"),
                "levels": self.slide.level_count, "read_level": self.level, "read_level_mpp": round(level_mpp, 4),
                "tile_size": round(self.tile_size, 3), "tile_microns": self.patch_pixels * self.model_mpp,
                "origin": list(self.origin), "columns": self.columns, "rows": self.rows}

    def close(self) -> None:
        self.slide.close()

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
