"""Atomic file replacement: readers see the old content or the new, never half a file.

Every file Miles writes for another process to read (resolved configs, manifests, `latest`
pointers, rendezvous addresses, generated data) goes through here.
"""

import os
import tempfile
from pathlib import Path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    """Replace `target` with `text` (temp file in the same folder, fsync, rename, fsync folder)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)
    return target
