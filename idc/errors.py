"""The project's own exception types: each message says what was wrong and what to do."""


class IDCError(Exception):
    """Base class for the errors this package raises on purpose."""


class ConfigError(IDCError):
    """confs.json is missing, malformed, or a key is missing or of the wrong type."""


class DatasetError(IDCError):
    """The dataset folder is missing or holds no usable IDC patches."""


class WeightsError(IDCError):
    """Pretrained weights could not be loaded (e.g. no internet for the ImageNet download)."""


class ModelNotFoundError(IDCError):
    """A trained model or compiled IR is missing: run the step that makes it first."""


class ImageError(IDCError):
    """An image could not be decoded: not an image, or corrupt."""


class UnsupportedImageError(ImageError):
    """A readable image of a format we do not accept (only PNG, JPEG, BMP, TIFF)."""


class ImageTooLargeError(ImageError):
    """An image larger than the configured limit (or a decompression bomb)."""
