"""Training-time augmentation: the dihedral views of a patch and stain-jittered copies of it.

Patients differ mostly in staining and scanning, so training also sees each patch re-stained:
the haematoxylin, eosin and DAB channels (colour deconvolution, scikit-image's rgb2hed) each
scaled and shifted at random (HED jitter, Tellez et al. 2019), then brightness, contrast and
saturation jittered, then a random flip/rotation. A stain view is named "stain<k>"; its draws
are seeded by the image's content hash and k, so a view is the same image every time (and the
bottleneck cache can hold it).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
from skimage.color import hed2rgb, rgb2hed

from idc.keras_model import view_array
from idc.core.preprocessing import preprocess

STAIN_VIEW = re.compile(r"stain([1-9][0-9]*)")
STAIN_KEYS = ("hed", "brightness", "contrast", "saturation")
# rgb2hed returns optical density divided by ln(10^6); Tellez's bias is in optical density units.
OD_UNIT = 1.0 / np.log(1e6)


def is_stain_view(view: str) -> bool:
    return STAIN_VIEW.fullmatch(view) is not None


def view_rng(digest: str, view: str, seed: int) -> np.random.Generator:
    """The random draws of one stain view of one image: a function of its content and the view."""
    key = hashlib.sha1(f"{seed}:{digest}:{view}".encode()).digest()
    return np.random.default_rng(np.frombuffer(key[:16], dtype=np.uint32))


def stain_jitter(image: np.ndarray, rng: np.random.Generator, strength: dict[str, float]) -> np.ndarray:
    """A re-stained copy of an RGB uint8 image (same shape): HED jitter, then brightness,
    contrast and saturation jitter; `strength` gives each one's maximum relative change."""
    hed = rgb2hed(image)
    alpha = rng.uniform(1 - strength["hed"], 1 + strength["hed"], 3)
    beta = rng.uniform(-strength["hed"], strength["hed"], 3) * OD_UNIT
    rgb = hed2rgb(np.maximum(hed * alpha + beta, 0))  # float in [0, 1]
    brightness, contrast, saturation = (rng.uniform(1 - strength[k], 1 + strength[k])
                                        for k in ("brightness", "contrast", "saturation"))
    rgb = rgb * brightness
    rgb = (rgb - rgb.mean()) * contrast + rgb.mean()
    grey = rgb @ np.array([0.299, 0.587, 0.114])  # PIL's luma, as ImageEnhance.Color uses
    rgb = grey[..., None] + (rgb - grey[..., None]) * saturation
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def random_dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/rotations of an image, drawn from `rng`."""
    flipped = image[:, ::-1] if rng.random() < 0.5 else image
    return np.ascontiguousarray(np.rot90(flipped, int(rng.integers(4))))


def augmented(image: np.ndarray, rng: np.random.Generator, strength: dict[str, float] | None) -> np.ndarray:
    """A patch re-stained (with `strength`; as it is without) and in a random flip or rotation."""
    return random_dihedral(stain_jitter(image, rng, strength) if strength else image, rng)


def view_batch(images: list[np.ndarray], digests: list[str], view: str, image_size: int,
               strength: dict[str, float] | None = None, seed: int = 0) -> np.ndarray:
    """The model's input batch (N, S, S, 3) for one view of decoded RGB images."""
    if not is_stain_view(view):
        return view_array(preprocess(images, image_size), view)
    if strength is None:
        raise ValueError(f"view {view!r} needs the stain jitter strengths ({', '.join(STAIN_KEYS)})")
    return preprocess([augmented(image, view_rng(digest, view, seed), strength)
                       for image, digest in zip(images, digests)], image_size)


def describe_view(view: str, strength: dict[str, float] | None, seed: int) -> str:
    """What makes a view's pixels: keys the bottleneck cache, so a changed strength recomputes."""
    if not is_stain_view(view):
        return view
    return f"{view}:" + ",".join(f"{k}={strength[k]:g}" for k in STAIN_KEYS) + f":seed={seed}"


