"""The project's own exception types: each message says what was wrong and what to do."""


class IDCError(Exception):
    """Base class for the errors this package raises on purpose."""


class ConfigError(IDCError):
    """confs.json is missing, malformed, or a key is missing or of the wrong type."""


class DatasetError(IDCError):
    """The dataset folder is missing, holds no usable IDC patches, or a split is empty."""


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


class DeviceError(IDCError):
    """The requested OpenVINO device is not present on this machine."""


class ParityError(IDCError):
    """A compiled model disagrees with TensorFlow more than allowed."""


class ListenError(IDCError):
    """The server cannot listen on its address (a port in use, an address not on this machine)."""
