"""The data layer's one error type, in its own module so that every reader (io, dicom, runs) can raise it."""

from __future__ import annotations


class DataFileError(ValueError):
    """A file that cannot be used as an image or mask; the message names the file."""
