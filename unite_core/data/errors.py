"""Errors shared by the data modules."""

from __future__ import annotations


class DataError(RuntimeError):
    """A user-facing data problem (missing file, corrupt cache, empty dataset).

    The message names the setting or file involved and what to do about it.
    """
