"""Per-slide stain normalisation: Reinhard et al. (2001) with the statistics of a whole slide.

A slide's tissue pixels (saturation >= the tissue rule's MIN_SATURATION, so glass and fat do not
count) give the mean and spread of its lαβ channels (RGB -> LMS cone space -> log10 -> lαβ, where
the channels are nearly decorrelated, so each can be standardised on its own); every pixel of the
slide's patches is then shifted and scaled so that those become the training patients' typical
ones, the bundle's target (`stain_normalization: {"method": "slide", ...}`). Statistics of the
slide, not of each patch: a patch of fat or glass has few tissue pixels, and per-patch statistics
stretch their noise into colour casts (the per-image "reinhard" layer's weakness).

Applied where a slide's or a patient's patches are classified together: evaluate.py (each patient's
patches), whole slides (a sample of the slide's tissue tiles), and the validation patients that
choose the decision rule. A patch sent on its own (the API, inception_test.py on files) has no slide
to measure, and is classified as it is. NumPy and Pillow only: this runs on the edge box.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from idc.core.errors import ImageError
from idc.core.preprocessing import decode_image
from idc.slides.tissue import tissue_pixels

RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
LOG_LMS_TO_LAB = np.diag([3 ** -0.5, 6 ** -0.5, 2 ** -0.5]) @ np.array([[1, 1, 1], [1, 1, -2], [1, -1, 0]])
LAB_TO_LOG_LMS, LMS_TO_RGB = np.linalg.inv(LOG_LMS_TO_LAB), np.linalg.inv(RGB_TO_LMS)
MIN_TISSUE_PIXELS = 1000  # fewer (under half a patch) measure nothing: such a slide is left as it is
SAMPLE_TILES = 256  # of a whole slide's tissue tiles, spread over it: its statistics, at a few seconds' cost


def to_lab(rgb: np.ndarray) -> np.ndarray:
    """lαβ (float64, same shape) of RGB uint8 pixels (..., 3)."""
    linear = np.clip(np.asarray(rgb, dtype=np.float64) / 255.0, 1.0 / 255.0, 1.0)
    return np.log10(linear @ RGB_TO_LMS.T) @ LOG_LMS_TO_LAB.T


def from_lab(lab: np.ndarray) -> np.ndarray:
    """RGB uint8 pixels of lαβ ones (to_lab's inverse, clipped to the RGB cube)."""
    rgb = (10.0 ** (lab @ LAB_TO_LOG_LMS.T)) @ LMS_TO_RGB.T
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Stain:
    """The mean and standard deviation of a slide's (or a set of slides') tissue pixels in lαβ."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def typical(cls, stains: list[Stain]) -> Stain:
        """The stain of a typical slide among `stains`: the mean of their means and of their spreads."""
        return cls(tuple(np.mean([s.mean for s in stains], axis=0).tolist()),
                   tuple(np.mean([s.std for s in stains], axis=0).tolist()))

    @classmethod
    def from_bundle(cls, normalization: dict | None) -> Stain | None:
        """The target of a bundle's stain_normalization when it is per slide; None otherwise."""
        if not normalization or normalization.get("method") != "slide":
            return None
        return cls(tuple(normalization["target_mean"]), tuple(normalization["target_std"]))


class StainStatistics:
    """The lαβ moments of the tissue pixels of many images (a slide's tiles, a patient's patches),
    added one image at a time."""

    def __init__(self):
        self.pixels, self._sum, self._squares = 0, np.zeros(3), np.zeros(3)

    def add(self, image: np.ndarray) -> None:
        rgb = np.asarray(image)[..., :3]
        lab = to_lab(rgb[tissue_pixels(rgb)])
        self.pixels += len(lab)
        self._sum += lab.sum(axis=0)
        self._squares += (lab ** 2).sum(axis=0)

    def stain(self) -> Stain | None:
        """The stain measured, or None with fewer than MIN_TISSUE_PIXELS tissue pixels."""
        if self.pixels < MIN_TISSUE_PIXELS:
            return None
        mean = self._sum / self.pixels
        std = np.sqrt(np.maximum(self._squares / self.pixels - mean ** 2, 0.0))
        return Stain(tuple(mean.tolist()), tuple(std.tolist()))


def normalise(image: np.ndarray, source: Stain | None, target: Stain) -> np.ndarray:
    """`image` (RGB uint8) of a slide stained `source`, re-stained as `target` (as it is for None)."""
    if source is None:
        return image
    lab = to_lab(np.asarray(image)[..., :3])
    scale = np.asarray(target.std) / np.maximum(np.asarray(source.std), 1e-4)
    return from_lab((lab - np.asarray(source.mean)) * scale + np.asarray(target.mean))


def patient_stains(patches) -> dict[str, Stain | None]:
    """Each patient's stain, from all their readable patches (anything with .patient and .path);
    None for a patient with too little tissue to measure."""
    statistics = defaultdict(StainStatistics)
    for patch in patches:
        measured = statistics[patch.patient]
        try:
            measured.add(decode_image(patch.path))
        except ImageError:
            continue  # counted where it is classified (evaluate.py) or sorted
    return {patient: s.stain() for patient, s in statistics.items()}
