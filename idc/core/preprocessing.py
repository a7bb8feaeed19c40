"""THE preprocessing: one function used by training, evaluation, the compiled-model test and
the server alike (the 2018 original preprocessed differently in evaluation and inference).

Decoding and resizing use Pillow and NumPy only, so the edge box needs no TensorFlow.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from idc.core.errors import ImageError, ImageTooLargeError, UnsupportedImageError
from idc.core.files import FORMAT_NAMES, IMAGE_FORMATS
# Slide background is white: short edge patches are padded with it, not stretched.
PAD_VALUE = 255


def decode_image(source: bytes | str | Path, max_side: int | None = None) -> np.ndarray:
    """Decode a PNG/JPEG/BMP/TIFF (bytes or a path) into an RGB uint8 array (H, W, 3).

    Raises ImageError with the reason for anything that is not a readable image,
    UnsupportedImageError for another format, and ImageTooLargeError for an image over
    `max_side` pixels a side or a decompression bomb (both checked before pixels are decoded).
    """
    try:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
    except OSError as err:
        raise ImageError(f"cannot read {source}: {err.strerror}") from None
    if not data:
        raise ImageError("empty file: no image data")
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:  # refused before decoding
                raise UnsupportedImageError(f"unsupported image format {image.format}; use {FORMAT_NAMES}")
            if max_side is not None and max(image.size) > max_side:
                raise ImageTooLargeError(
                    f"image is {image.size[0]}x{image.size[1]} px; the limit is {max_side} px a side")
            return np.asarray(image.convert("RGB"))
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        limit = f"; the limit is {max_side} px a side" if max_side else ""
        raise ImageTooLargeError(f"image too large, refused before decoding ({err}){limit}") from None
    except UnidentifiedImageError:
        raise ImageError(f"not an image: send {FORMAT_NAMES} bytes") from None
    except Exception as err:  # noqa: BLE001  decoders raise many types on hostile data: all mean corrupt
        raise ImageError(f"corrupt image data: {type(err).__name__}: {str(err)[:200]}") from None


def resize_patch(image: np.ndarray, image_size: int) -> np.ndarray:
    """Pad to a square with white (keeps the aspect of short edge patches), then resize."""
    height, width = image.shape[:2]
    side = max(height, width)
    if height != width:
        square = np.full((side, side, 3), PAD_VALUE, dtype=np.uint8)
        square[:height, :width] = image
        image = square
    if side != image_size:
        image = np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
    return image


def preprocess(images: np.ndarray | list[np.ndarray], image_size: int) -> np.ndarray:
    """RGB uint8 images -> float32 batch (N, S, S, 3) scaled to [-1, 1] (Inception's input)."""
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = [images]
    batch = np.stack([resize_patch(image, image_size) for image in images]).astype(np.float32)
    return batch / 127.5 - 1.0


def load_batch(paths: list[str | Path], image_size: int) -> np.ndarray:
    """Decode and preprocess a list of image files in one go."""
    return preprocess([decode_image(path) for path in paths], image_size)

