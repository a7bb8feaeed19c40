"""Training-time augmentation: the dihedral views of a patch, stain-jittered copies of it, and
JPEG-compressed copies of it.

Patients differ mostly in staining and scanning, so training also sees each patch re-stained:
the haematoxylin, eosin and DAB channels (colour deconvolution, scikit-image's rgb2hed) each
scaled and shifted at random (HED jitter, Tellez et al. 2019), then brightness, contrast and
saturation jittered, then a random flip/rotation. A stain view is named "stain<k>"; its draws
are seeded by the image's content hash and k, so a view is the same image every time (and the
bottleneck cache can hold it).

Whole-slide scanners store their tiles as JPEG (quality 60-95, chroma often subsampled: Aperio's
.svs, like ../shared's slides, hold YCbCr 4:2:0), while the dataset's patches are lossless PNGs, and
a model that never saw JPEG artefacts reads them as less IDC (measured: P(IDC) fell by 0.15 on
average at quality 90, 4:2:0, on validation patients). A JPEG view "jpeg<k>" is the patch compressed
at a quality drawn from JPEG_QUALITY with 4:2:0 chroma, in a random flip/rotation, seeded like a
stain view. In a slide a patch lies anywhere on the scanner's 16 px block grid, so it is compressed
at a random block phase (padded by reflection on the top and left, cropped after), not always
aligned to the grid. With a JPEG view among the training views, the phases that train on decoded
patches compress half of them the same way.

A slide's tile is also never quite as sharp as its patch: the scanner's focus varies, and the slide
path resamples each tile from a pyramid level to the model's scale. A blur view "blur<k>" is the
patch under a Gaussian blur of a standard deviation drawn from BLUR_SIGMA, in a random flip or
rotation, seeded like a stain view. The head's scan invariance (`scan_invariance`) pairs each JPEG or
blurred copy with the same pixels as they are (view_twin). With a blur view among the training
views, the phases that train on decoded patches blur half of them the same way.
"""

from __future__ import annotations

import hashlib
import io
import re

import numpy as np
from PIL import Image, ImageFilter
from skimage.color import hed2rgb, rgb2hed

from idc.keras_model import view_array
from idc.core.preprocessing import preprocess

STAIN_VIEW = re.compile(r"stain([1-9][0-9]*)")
JPEG_VIEW = re.compile(r"jpeg([1-9][0-9]*)")
BLUR_VIEW = re.compile(r"blur([1-9][0-9]*)")
BLUR_SIGMA = (0.25, 1.0)  # px of the patch: Gaussian blur's standard deviation, drawn from (inclusive)
JPEG_QUALITY = (60, 95)  # what slide scanners write (Aperio's default is 70), inclusive
JPEG_SUBSAMPLING = (2,)  # drawn from: Pillow's 4:2:0, as Aperio's .svs (and ../shared's slides) hold
JPEG_BLOCK = 16  # px: the largest JPEG block (a 4:2:0 MCU); the phase is drawn below it
JPEG_SHARE = 0.5  # of the patches compressed, in the phases that train on decoded patches
BLUR_SHARE = 0.5  # of the patches blurred, likewise
STAIN_KEYS = ("hed", "brightness", "contrast", "saturation")
# rgb2hed returns optical density divided by ln(10^6); Tellez's bias is in optical density units.
OD_UNIT = 1.0 / np.log(1e6)


def is_stain_view(view: str) -> bool:
    return STAIN_VIEW.fullmatch(view) is not None


def is_jpeg_view(view: str) -> bool:
    return JPEG_VIEW.fullmatch(view) is not None


def is_blur_view(view: str) -> bool:
    return BLUR_VIEW.fullmatch(view) is not None


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


def _jpeg_draws(rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(quality, chroma subsampling, dy, dx of the block phase) of one JPEG round trip."""
    quality = int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    subsampling = int(rng.choice(JPEG_SUBSAMPLING))
    dy, dx = (int(v) for v in rng.integers(JPEG_BLOCK, size=2))
    return quality, subsampling, dy, dx


def _dihedral_draws(rng: np.random.Generator) -> tuple[bool, int]:
    """(mirrored, quarter turns) of one flip/rotation."""
    flip = bool(rng.random() < 0.5)
    return flip, int(rng.integers(4))


# The flip/rotation (mirrored, quarter turns) of each test-time view, as random_dihedral makes it.
VIEW_DIHEDRAL = {(False, 0): "identity", (True, 0): "hflip", (True, 2): "vflip", (False, 1): "rot90"}


def jpeg_compressed(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image after a JPEG round trip at a quality, chroma subsampling and block phase drawn from `rng`."""
    quality, subsampling, dy, dx = _jpeg_draws(rng)
    padded = np.pad(image, ((dy, 0), (dx, 0), (0, 0)), mode="reflect")
    buffer = io.BytesIO()
    Image.fromarray(padded).save(buffer, "JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(buffer).convert("RGB"))[dy:, dx:]


def random_dihedral(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/rotations of an image, drawn from `rng`."""
    flip, turns = _dihedral_draws(rng)
    return np.ascontiguousarray(np.rot90(image[:, ::-1] if flip else image, turns))


def _blur_draws(rng: np.random.Generator) -> float:
    """The standard deviation (px) of one Gaussian blur."""
    return float(rng.uniform(*BLUR_SIGMA))


def blurred(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The image under a Gaussian blur of a standard deviation drawn from BLUR_SIGMA (px)."""
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(_blur_draws(rng))))


def view_twin(digest: str, view: str, seed: int) -> str | None:
    """The test-time view (identity, hflip, vflip or rot90) in whose flip/rotation JPEG or blur view `view`
    holds the image of `digest`, or None (the other 4 of the 8): pairs the compressed or blurred copy
    with the same pixels as they are. Replays view_batch's draws."""
    rng = view_rng(digest, view, seed)
    (_jpeg_draws if is_jpeg_view(view) else _blur_draws)(rng)
    return VIEW_DIHEDRAL.get(_dihedral_draws(rng))


def shifted(image: np.ndarray, rng: np.random.Generator, shift: int) -> np.ndarray:
    """The image moved by up to `shift` px along each axis (drawn from `rng`), the edge filled by reflection."""
    dy, dx = (int(d) for d in rng.integers(-shift, shift + 1, size=2))
    height, width = image.shape[:2]
    padded = np.pad(image, ((shift, shift), (shift, shift), (0, 0)), mode="reflect")
    return padded[shift + dy:shift + dy + height, shift + dx:shift + dx + width]


def augmented(image: np.ndarray, rng: np.random.Generator, strength: dict[str, float] | None,
              jpeg: bool = False, blur: bool = False, shift: int = 0) -> np.ndarray:
    """A patch moved by up to `shift` px (a patch's tissue could lie anywhere in it), re-stained (with
    `strength`; as it is without), JPEG-compressed JPEG_SHARE of the time (with `jpeg`), blurred
    BLUR_SHARE of the time (with `blur`: after the compression, as the slide path resamples the decoded
    tile), and in a random flip or rotation."""
    if shift:
        image = shifted(image, rng, shift)
    if strength:
        image = stain_jitter(image, rng, strength)
    if jpeg and rng.random() < JPEG_SHARE:
        image = jpeg_compressed(image, rng)
    if blur and rng.random() < BLUR_SHARE:
        image = blurred(image, rng)
    return random_dihedral(image, rng)


def view_batch(images: list[np.ndarray], digests: list[str], view: str, image_size: int,
               strength: dict[str, float] | None = None, seed: int = 0) -> np.ndarray:
    """The model's input batch (N, S, S, 3) for one view of decoded RGB images."""
    if is_jpeg_view(view) or is_blur_view(view):
        degrade = jpeg_compressed if is_jpeg_view(view) else blurred
        views = []
        for image, digest in zip(images, digests):
            rng = view_rng(digest, view, seed)
            views.append(random_dihedral(degrade(image, rng), rng))
        return preprocess(views, image_size)
    if not is_stain_view(view):
        return view_array(preprocess(images, image_size), view)
    if strength is None:
        raise ValueError(f"view {view!r} needs the stain jitter strengths ({', '.join(STAIN_KEYS)})")
    return preprocess([augmented(image, view_rng(digest, view, seed), strength)
                       for image, digest in zip(images, digests)], image_size)


def describe_view(view: str, strength: dict[str, float] | None, seed: int) -> str:
    """What makes a view's pixels: keys the bottleneck cache, so a changed strength recomputes."""
    if is_jpeg_view(view):
        return (f"{view}:quality={JPEG_QUALITY[0]}-{JPEG_QUALITY[1]}:subsampling={JPEG_SUBSAMPLING}:"
                f"phase<{JPEG_BLOCK}:seed={seed}")
    if is_blur_view(view):
        return f"{view}:gaussian_sigma={BLUR_SIGMA[0]}-{BLUR_SIGMA[1]}:seed={seed}"
    if not is_stain_view(view):
        return view
    return f"{view}:" + ",".join(f"{k}={strength[k]:g}" for k in STAIN_KEYS) + f":seed={seed}"


