"""The project's own exception types, all of them: each message says what was wrong and what to do.

Standard library only: every machine (the Raspberry Pi too) imports this."""


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


class SlideError(IDCError):
    """A whole-slide image cannot be used: not a slide OpenSlide reads, truncated, no scale, no tissue."""


class DeviceError(IDCError):
    """The requested OpenVINO device is not present on this machine."""


class ParityError(IDCError):
    """A compiled model disagrees with TensorFlow more than allowed."""


class ListenError(IDCError):
    """The server cannot listen on its address (a port in use, an address not on this machine)."""


class ReviewStoreError(IDCError):
    """The review station's SQLite database cannot be used (corrupt, locked, unwritable)."""


class ReviewExportError(IDCError):
    """A review export CSV (extra labelled training data) is missing, malformed or has bad rows."""


class ClusterError(IDCError):
    """The cluster cannot be described: a bad TF_CONFIG, or a scheduler variable (Slurm, PBS) that is
    missing or malformed; the message names the variable."""


class ClusterWaitError(ClusterError):
    """A worker waited in vain for the others: their share of the bottleneck cache stopped arriving (a worker
    died, never started, or does not see the same cache folder)."""


class ApiError(Exception):
    """An HTTP API error, answered as `{"Response": "FAILED", "ResponseMessage": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


class IgnoredMessage(Exception):
    """An MQTT message the alarm does not act on; the text says why."""
