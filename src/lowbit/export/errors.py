"""The one exception type of the export package."""

from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be written or a folder that cannot be loaded; the message is one line
    that says what is wrong and, where there is one, what to change."""
