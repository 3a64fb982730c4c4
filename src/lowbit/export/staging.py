"""A folder built under a temporary name and renamed into place only once it is complete.

A crash, a full disk or Ctrl-C while exporting must never leave something at the requested path
that looks like a finished model: everything is written into a hidden sibling named
`.NAME.lowbit-partial-XXXX`, which `commit` renames to NAME (on the same filesystem a rename is
atomic). An existing folder that `overwrite` allows to replace stays untouched until that moment.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from lowbit.export.errors import ExportError


def refuse_existing(target: Path, overwrite: bool) -> None:
    """Fail early, before hours of quantization, if `target` cannot be (re)placed."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ExportError(f"{target} exists and is not a directory; choose another output path")
    if not overwrite and any(target.iterdir()):
        raise ExportError(
            f"{target} already exists and is not empty; choose another path "
            "or pass --overwrite (overwrite=True) to replace it"
        )


class StagingDir:
    """The temporary sibling of `target` that the export is written into."""

    def __init__(self, target: Path, overwrite: bool) -> None:
        refuse_existing(target, overwrite)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.target = target
        self.overwrite = overwrite
        self.path = Path(tempfile.mkdtemp(prefix=f".{target.name}.lowbit-partial-", dir=target.parent))

    def commit(self) -> None:
        """Move the finished folder to `target`, replacing what `overwrite` allows to replace."""
        refuse_existing(self.target, self.overwrite)
        if not self.target.exists():
            self.path.rename(self.target)
            return
        if not any(self.target.iterdir()):
            self.target.rmdir()
            self.path.rename(self.target)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.lowbit-replaced-", dir=self.target.parent))
        self.target.rename(old / self.target.name)
        self.path.rename(self.target)
        shutil.rmtree(old)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
