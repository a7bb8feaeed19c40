"""One slide, start to end: open it at the model's scale, analyse it, write its outputs. What the
CLI (`inception_test.py --slide`) and the edge server's slide worker both call."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from idc.core.config import Config
from idc.slides.analysis import SlideResult, analyse_slide
from idc.slides.outputs import write_outputs
from idc.slides.reader import SlideReader


def slide_id(path: str | Path) -> str:
    """A slide's folder name under Config.slides_dir: its file name without suffix, in safe characters."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem).strip("._") or "slide"


def process_slide(config: Config, classifier, path: str | Path, folder: str | Path | None = None,
                  mpp: float | None = None, origin: tuple[int, int] = (0, 0),
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> tuple[dict, SlideResult, Path]:
    """Classify the slide at `path` with `classifier` and write its outputs to `folder` (default:
    Config.slides_dir / slide_id(path)). `mpp`: the level-0 scale when the file does not say
    (default Slides.default_mpp). Returns (summary, result, folder). SlideError on a bad slide."""
    settings = config.Slides
    bundle = classifier.bundle
    folder = Path(folder) if folder else config.slides_dir / slide_id(path)
    with SlideReader(path, bundle.microns_per_pixel, bundle.patch_pixels, mpp or settings.default_mpp,
                     origin) as reader:
        result = analyse_slide(reader, classifier, settings.min_tissue, settings.batch_size, progress, should_stop)
    return write_outputs(result, folder), result, folder
