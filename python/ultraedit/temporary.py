"""Temporary files that never stay behind, whatever interrupts their writer (torch-free: the CLI
uses it before it loads torch)."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator, Tuple

__all__ = ["atomic_write", "temporary_file"]


@contextlib.contextmanager
def temporary_file(folder, prefix: str, suffix: str = "") -> Iterator[Tuple[int, str]]:
    """``(fd, path)`` of a new private (0600) file ``folder/<prefix><random><suffix>``, removed
    when the block ends unless the block renamed it away (``os.replace``: an atomic write). The
    caller owns ``fd`` (``os.fdopen`` it or ``os.close`` it).

    The name is chosen before the file exists, so that an interrupt anywhere (Ctrl-C even inside
    the call that creates the file, where ``tempfile.mkstemp`` would not yet have returned its
    name) leaves nothing behind: the file is removed by name."""
    path = os.path.join(os.fspath(folder), f"{prefix}{secrets.token_hex(6)}{suffix}")
    ours = True
    try:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            ours = False       # another file of that name: not ours to remove
            raise
        yield fd, path
    finally:
        if ours:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@contextlib.contextmanager
def atomic_write(path, binary: bool = False, encoding: str = "utf-8",
                 mode: int = 0o666) -> Iterator:
    """A file object whose contents replace ``path`` only when the block ends without an error:
    written to a temporary file in the same folder, then renamed over ``path`` (a reader never
    sees half a file, a failed write leaves the previous file as it was and nothing beside it).
    The file gets ``mode`` less the user's umask (the default: what a new file gets). A symbolic link's target
    is replaced, not the link; a FIFO or a device (``/dev/stdout``) is written in place."""
    # a symbolic link: its target is replaced (the link stays); a FIFO or a device such as
    # /dev/stdout: written in place (renaming over it would replace the node itself)
    path = os.path.realpath(os.fspath(path))
    if os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
        with open(path, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as fh:
            yield fh
        return
    folder = os.path.dirname(path)
    with temporary_file(folder, f".{os.path.basename(path)}.", ".tmp") as (fd, tmp):
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding=encoding)) as fh:
            yield fh
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, mode & ~umask)
        os.replace(tmp, path)
