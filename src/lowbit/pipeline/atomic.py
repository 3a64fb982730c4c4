"""Files that are either entirely there or not there at all, even after a kill -9 or a power cut.

A rename within one filesystem is atomic, but only data that reached the disk survives a crash:
the content is written under a temporary name and fsync'ed, then renamed, then the directory is
fsync'ed so that the rename itself is durable. A reader therefore never sees a half-written file
under its final name, which is what lets an interrupted run trust every file it finds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

TEMP_SUFFIX = ".tmp"


def fsync_path(path: Path) -> None:
    """Flush one file or directory to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(temp: Path, final: Path) -> None:
    """Make the fully written `temp` appear as `final`: fsync it, rename it, fsync the folder."""
    fsync_path(temp)
    os.replace(temp, final)
    fsync_path(final.parent)


def write_atomic(final: Path, write: Callable[[Path], None]) -> None:
    """Let `write` fill a temporary file beside `final`, then commit it under the final name."""
    temp = final.with_name(final.name + TEMP_SUFFIX)
    try:
        write(temp)
        commit(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_json_atomic(final: Path, data: Any) -> None:
    write_atomic(final, lambda temp: temp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))
