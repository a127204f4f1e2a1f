"""Temporary files that never stay behind, whatever interrupts their writer (torch-free: the CLI
uses it before it loads torch)."""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Iterator, Tuple

__all__ = ["temporary_file"]


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
