"""One slide through the edge engine: tissue tiles read in batches (the next batch is read while
the engine classifies the current one), P(IDC) per tile, the decision rule, and the bundle's
slide-context rule on the slide's own tile grid (every neighbour with tissue is there, unlike a
sample of patches). Memory stays bounded by a batch of tiles plus a few numbers per tile, whatever
the slide's size. Ctrl-C (KeyboardInterrupt) or `should_stop` ends it between batches, with
nothing written (see outputs.write_outputs).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from idc.core import metrics
from idc.core.context import GRID, apply_rule, rule_fields
from idc.core.errors import SlideError
from idc.slides.reader import SlideReader, Tile
from idc.slides.stain import SAMPLE_TILES, Stain, StainStatistics, normalise
from idc.slides.tissue import TissueMask, tile_shares, tissue_mask

log = logging.getLogger(__name__)


class Stopped(Exception):
    """The analysis was asked to stop (should_stop returned True) before it finished."""


@dataclass
class SlideResult:
    slide: dict  # SlideReader.describe()
    tiles: list[Tile]  # the classified (tissue) tiles, row by row
    tissue: np.ndarray  # each classified tile's tissue share
    p_alone: np.ndarray  # P(IDC) of each tile alone
    p_idc: np.ndarray  # the slide's answer: with slide context where the bundle has a rule, else p_alone
    threshold: float  # of p_idc
    review_band: float
    threshold_alone: float
    context: dict | None  # the bundle's slide-context rule applied, or None
    model: dict  # Classifier.describe()
    tissue_mask: TissueMask
    seconds: dict = field(default_factory=dict)  # tissue, classify (read + infer), total

    @property
    def idc(self) -> np.ndarray:
        return (self.p_idc >= self.threshold).astype(int)

    @property
    def needs_review(self) -> np.ndarray:
        return metrics.decide(self.p_idc, self.threshold, self.review_band)[1]

    @property
    def idc_alone(self) -> np.ndarray:
        return (self.p_alone >= self.threshold_alone).astype(int)

    @property
    def needs_review_alone(self) -> np.ndarray:
        return metrics.decide(self.p_alone, self.threshold_alone, self.review_band)[1]


def tissue_tiles(reader: SlideReader, min_tissue: float) -> tuple[list[Tile], np.ndarray, TissueMask]:
    """The grid's tiles holding at least `min_tissue` tissue, row by row, with their shares."""
    mask = tissue_mask(reader)
    shares = tile_shares(reader, mask)
    rows, columns = np.nonzero(shares >= min_tissue)
    return [reader.tile(int(c), int(r)) for r, c in zip(rows, columns)], shares[rows, columns], mask


def slide_stain_of(reader: SlideReader, tiles: list[Tile], sample: int = SAMPLE_TILES) -> Stain | None:
    """The slide's stain (idc.slides.stain), from up to `sample` of its tissue tiles spread evenly over it."""
    statistics = StainStatistics()
    for image in reader.read(tiles[::max(1, len(tiles) // sample)][:sample]):
        statistics.add(image)
    return statistics.stain()


def analyse_slide(reader: SlideReader, classifier, min_tissue: float = 0.1, batch_size: int = 16,
                  progress: Callable[[int, int], None] | None = None,
                  should_stop: Callable[[], bool] | None = None) -> SlideResult:
    """Classify every tissue tile of `reader`'s slide with `classifier` (an idc.edge.engine.Classifier).
    `progress(done, total)` is called after each batch. SlideError when the slide holds no tissue.
    With a bundle whose stain normalisation is per slide, every tile is normalised with the slide's stain."""
    started = time.perf_counter()
    tiles, shares, mask = tissue_tiles(reader, min_tissue)
    found = time.perf_counter()
    if not tiles:
        raise SlideError(f"{reader.path.name}: no tissue found (saturation threshold {mask.threshold} of 255, "
                         f"{100 * mask.area_share():.2f} % of the slide): nothing to classify. Is it blank, "
                         f"or mostly out of focus? (Slides.min_tissue is {min_tissue})")
    target = Stain.from_bundle(classifier.bundle.stain_normalization)
    source = slide_stain_of(reader, tiles) if target is not None else None
    batches = [tiles[i:i + batch_size] for i in range(0, len(tiles), batch_size)]
    p = np.empty(len(tiles), dtype=np.float32)
    done = 0
    # One reader thread: OpenSlide decodes (and releases the GIL) while the engine infers.
    with ThreadPoolExecutor(1, thread_name_prefix="slide-reader") as pool:
        pending = pool.submit(reader.read, batches[0])
        for index in range(len(batches)):
            images = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(reader.read, batches[index + 1])
            if should_stop is not None and should_stop():
                raise Stopped(f"{reader.path.name}: stopped after {done} of {len(tiles)} tiles")
            if target is not None:
                images = [normalise(image, source, target) for image in images]
            p[done:done + len(images)] = classifier.probabilities(images)
            done += len(images)
            if progress is not None:
                progress(done, len(tiles))
    classified = time.perf_counter()

    bundle = classifier.bundle
    rule = bundle.slide_context
    if rule:
        # The grid in the dataset's units (GRID px a step), so the bundle's radius means the same here.
        p_idc = apply_rule(rule, [reader.path.name] * len(tiles), [t.column * GRID for t in tiles],
                           [t.row * GRID for t in tiles], p).astype(np.float32)
        threshold = float(rule["threshold"])
        context = rule_fields(rule)
    else:
        p_idc, threshold, context = p, classifier.threshold, None
    return SlideResult(slide=reader.describe(), tiles=tiles, tissue=shares, p_alone=p, p_idc=p_idc,
                       threshold=threshold, review_band=classifier.review_band, threshold_alone=classifier.threshold,
                       context=context, model=classifier.describe(), tissue_mask=mask,
                       seconds={"tissue": round(found - started, 3), "classify": round(classified - found, 3),
                                "total": round(classified - started, 3)})
