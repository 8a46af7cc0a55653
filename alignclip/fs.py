"""Atomic, durable writes: a reader (or a process restarted after a crash or a power loss) sees the old content or
the new one under the final name, never a part of it.

The one recipe, used by every writer of the package: write a temporary in the same folder (a rename is atomic only
within one file system), fsync it, rename it over the final name, fsync the folder (the rename itself is then on
disk). A process killed half-way leaves at most a hidden ``.NAME.tmp-XXXX`` temporary beside the file, never a
truncated file under its final name.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

# errors that say a folder cannot take a write (read-only, no permission, full, over quota): the user's to fix
UNWRITABLE_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT})


def temp_path(path: str | Path) -> Path:
    """A private temporary name beside ``path``, unique across the processes and hosts that share a file system."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


def fsync_path(path: str | Path) -> None:
    """Make a file's bytes durable or, for a folder, its entries (files created, renamed or removed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | Path, path: str | Path) -> Path:
    """Move the complete file ``tmp`` (written by the caller, e.g. a streamed tar) over ``path``: fsync, rename,
    fsync the folder."""
    path = Path(path)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def atomic_write(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> Path:
    """Write ``data`` (text or bytes) to ``path`` atomically and durably; returns ``path``. On any failure the
    temporary is removed and ``path`` keeps its old content (or stays absent)."""
    path = Path(path)
    payload = data.encode(encoding) if isinstance(data, str) else data
    tmp = temp_path(path)
    try:
        tmp.write_bytes(payload)
        return replace_durably(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Publish the complete folder ``tmp`` as ``final`` (which must not exist): fsync every file and folder under
    ``tmp``, rename, fsync the parent. A crash before the rename leaves ``tmp`` (callers remove such leftovers)."""
    tmp, final = Path(tmp), Path(final)
    for folder, _, files in os.walk(tmp):
        for name in files:
            fsync_path(os.path.join(folder, name))
        fsync_path(folder)
    tmp.rename(final)
    fsync_path(final.parent)
    return final


def move_durably(src: str | Path, dst: str | Path) -> Path:
    """Rename the file or folder ``src`` to ``dst`` (which must not exist; the same filesystem), fsyncing the
    folders on both sides, so that the move survives a crash."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise FileExistsError(f"{dst} exists")
    src.rename(dst)
    fsync_path(dst.parent)
    if src.parent != dst.parent:
        fsync_path(src.parent)
    return dst
