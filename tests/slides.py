"""Small whole-slide images for the tests (a support module): real tiled, pyramidal TIFFs that
OpenSlide reads (its generic-tiff format, JPEG tiles), made from real or synthetic patches pasted
on glass, as ../shared/data/slides were made. Needs tifffile (a scikit-image dependency). Tiles are
deflate-compressed, so a level-0 read is lossless, or JPEG-compressed as a scanner's are (with
`jpeg_quality`: YCbCr with 4:2:0 chroma, as Aperio writes them and ../shared's slides hold; tifffile
encodes JPEG through imagecodecs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

GLASS = (242, 240, 245)  # the colour of the shared slides' empty glass


def write_slide(path: Path, image: np.ndarray, mpp: float | None, levels: int = 3, tile: int = 256,
                jpeg_quality: int | None = None, downsample: int = 2) -> Path:
    """`image` (RGB uint8) as a tiled pyramidal TIFF: level 0 and `levels - 1` reductions by `downsample`
    (marked reduced-resolution images, as OpenSlide needs to see them as levels); `mpp`
    (microns per pixel of level 0) in its resolution tags, or none at all when None; JPEG tiles at
    `jpeg_quality` (deflate when None)."""
    import tifffile

    path = Path(path)
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": "zlib"}
    if jpeg_quality is not None:  # photometric rgb: tifffile converts to YCbCr and subsamples the chroma
        options.update(compression="jpeg", compressionargs={"level": jpeg_quality}, subsampling=(2, 2))
    with tifffile.TiffWriter(path) as tif:
        level = image
        for index in range(levels):
            scale = downsample ** index
            tif.write(level, **options, subfiletype=1 if index else 0, **({} if mpp is None else
                                           {"resolution": (1e4 / (mpp * scale), 1e4 / (mpp * scale)),
                                            "resolutionunit": "CENTIMETER"}))
            if min(level.shape[:2]) < downsample * tile:
                break
            level = np.asarray(Image.fromarray(level).reduce(downsample))
    return path


def paste(patches: list[tuple[np.ndarray, int, int]], size: tuple[int, int], scale: int = 1,
          resample: int = Image.NEAREST) -> np.ndarray:
    """A glass canvas of `size` (width, height) with each (image, x, y) pasted at (x, y), all scaled
    up `scale` times (nearest neighbour by default, so a scale-1 read recovers the patches exactly)."""
    canvas = Image.new("RGB", (size[0] * scale, size[1] * scale), GLASS)
    for image, x, y in patches:
        tile = Image.fromarray(image)
        if scale != 1:
            tile = tile.resize((tile.width * scale, tile.height * scale), resample)
        canvas.paste(tile, (x * scale, y * scale))
    return np.asarray(canvas)
