"""What every subcommand shares: one-line errors, output paths checked before any work, atomic
JSON files, CPU threads and a description of the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ..temporary import temporary_file

EXIT_USAGE = 2          # a bad argument, path or input: one line on stderr, nothing done
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM
# = ultraedit.eval.EDIT_WORDINGS, spelled here so that --help does not import torch
EDIT_WORDINGS = ("prompt", "question", "both")


class UsageError(Exception):
    """A bad argument, path or input: reported as one line, exit status 2."""


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM (a scheduler's stop, ``timeout``) raises ``KeyboardInterrupt``,
    so a command stops as on Ctrl-C: its partial results kept and marked ``interrupted``."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def error(command: str, msg: str) -> int:
    """Print ``ultraedit COMMAND: error: MSG`` (one line) and return the exit status 2."""
    print(f"ultraedit {command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return EXIT_USAGE


def split_csv(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    items = [x.strip() for x in text.split(",") if x.strip()]
    return items or None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_output_paths(paths: Sequence[Tuple[str, Optional[str]]],
                       inputs: Sequence[Tuple[str, Optional[str]]] = (),
                       out_dirs: Sequence[Tuple[str, Optional[str]]] = ()) -> None:
    """Check, before any work, that every ``(flag, path)`` given can be written: not an existing
    folder, its folder exists and accepts a new file, no two flags name the same file, and no
    output replaces an input (``inputs``: the data file, an existing file in the model's
    folder). ``out_dirs``: ``(flag, path)`` written as folders (an export, a saved state): no
    other output lies in one, no input or other such folder either, and the nearest existing
    parent of each is a writable folder. Raises :class:`UsageError` naming the flag and the path."""
    seen: Dict[str, str] = {}
    given_inputs = [(flag, os.path.realpath(p)) for flag, p in inputs if p]
    folders = [(flag, path, os.path.realpath(path)) for flag, path in out_dirs if path]
    for i, (dir_flag, dir_path, out_folder) in enumerate(folders):
        for flag, other, other_folder in folders[i + 1:]:
            if _within(other_folder, out_folder) or _within(out_folder, other_folder):
                raise UsageError(f"{flag} {other!r} and {dir_flag} {dir_path!r} overlap; give "
                                 f"separate folders")
        for flag, inp in given_inputs:
            if _within(inp, out_folder) or _within(out_folder, inp):
                raise UsageError(f"{dir_flag} {dir_path!r} would overwrite {flag} {inp!r}")
        parent = out_folder
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise UsageError(f"{dir_flag} {dir_path!r}: {parent!r} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UsageError(f"{dir_flag} {dir_path!r}: cannot write to {parent!r}")
    for flag, path in paths:
        if not path:
            continue
        full = os.path.abspath(path)
        real = os.path.realpath(full)
        if real in seen:   # the same file, also through a symbolic link
            raise UsageError(f"{seen[real]} and {flag} both name {path!r}; give different files")
        seen[real] = flag
        for in_flag, inp in given_inputs:
            if real == inp or (os.path.isdir(inp) and _within(real, inp) and os.path.exists(real)):
                raise UsageError(f"{flag} {path!r} would overwrite {in_flag} {inp!r}")
        for dir_flag, dir_path, out_folder in folders:
            if _within(real, out_folder):
                raise UsageError(f"{flag} {path!r} lies in {dir_flag} {dir_path!r}; give a path "
                                 f"outside it")
        if os.path.isdir(full):
            raise UsageError(f"{flag} {path!r} is a folder; give a file name")
        if os.path.exists(real) and not os.path.isfile(real):   # a FIFO or /dev/stdout
            if not os.access(real, os.W_OK):
                raise UsageError(f"{flag} {path!r} cannot be written")
            continue
        folder = os.path.dirname(real)
        if not os.path.isdir(folder):
            what = "is not a folder" if os.path.exists(folder) else "does not exist"
            raise UsageError(f"{flag} {path!r}: {folder!r} {what}")
        try:   # the way the file will be written: a new file in that folder, then a rename
            with temporary_file(folder, ".ultraedit-check-") as (fd, _):
                os.close(fd)
        except OSError as err:
            raise UsageError(f"{flag} {path!r}: cannot write to {folder!r} "
                             f"({err.strerror or err})") from None
        if os.path.exists(full) and not os.access(full, os.W_OK):
            raise UsageError(f"{flag} {path!r} exists and is read-only")


def load_cli_model(name: str):
    """``ultraedit.models.load_model(name)``; a model that cannot be loaded (no such folder, a
    damaged weights file, a config that is not JSON) is a :class:`UsageError` naming it."""
    from ..models import load_model

    errors: Tuple[type, ...] = (OSError, ValueError)
    try:
        from safetensors import SafetensorError
        errors += (SafetensorError,)
    except ImportError:
        pass
    try:
        return load_model(name)
    except errors as err:
        raise UsageError(f"cannot load model {name!r}: {type(err).__name__}: {err}") from None


def write_json(result: Dict[str, Any], path: Optional[str], indent: int = 1) -> None:
    """Write ``result`` to ``path`` atomically (:func:`ultraedit.serialization.write_json_atomic`);
    nothing when no path was given."""
    if path:
        from ..serialization import write_json_atomic

        write_json_atomic(result, path, indent)


class RunJsonWriter:
    """``on_update`` for a run's JSON at ``path`` (None: writes nothing). Every change of stage
    is written; the rewrites after each turn are skipped while the time since the last write is
    under ``1 / share`` times that write's cost, so that rewriting a JSON that grows with the
    turns costs at most about ``share`` of the run (it grew quadratically: 2,000 turns of a tiny
    model spent longer writing the JSON than editing)."""

    def __init__(self, path: Optional[str], share: float = 0.05):
        self.path, self.share = path, share
        self.cost = 0.0
        self.done = float("-inf")

    def __call__(self, result: Dict[str, Any]) -> None:
        if not self.path:
            return
        status = str(result.get("status", ""))
        if (status.startswith(("turn ", "evaluation of turn "))
                and (time.perf_counter() - self.done) * self.share < self.cost):
            return
        start = time.perf_counter()
        write_json(result, self.path)
        self.done = time.perf_counter()
        self.cost = self.done - start


def default_threads() -> Optional[int]:
    """1 thread when the CPU is oversubscribed (load average above the core count): OpenMP
    threads that wait for each other are then many times slower than one thread. Otherwise
    None (torch's default)."""
    try:
        busy = os.getloadavg()[0] > (os.cpu_count() or 1)
    except (AttributeError, OSError):
        return None
    return 1 if busy else None


def add_machine_options(p) -> None:
    """``--threads`` and ``--no-progress``, which every long-running subcommand takes."""
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, or 1 on a busy CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_threads(threads: Optional[int]) -> None:
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")


_host_allocator: Optional[str] = None   # what prepare_machine's keep_freed_memory said


def prepare_machine(threads: Optional[int]) -> int:
    """Set a long-running subcommand's process up: keep freed host memory
    (:func:`ultraedit.host_allocator.keep_freed_memory`, recorded by :func:`machine`) and apply
    ``--threads`` (or :func:`default_threads`); returns torch's thread count."""
    global _host_allocator
    import torch

    from ..host_allocator import keep_freed_memory

    _host_allocator = keep_freed_memory()
    threads = threads or default_threads()
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def machine() -> Dict[str, Any]:
    """Platform, Python, torch, CPU, threads, GPU, host allocator and load average, for result
    files."""
    import torch

    info: Dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "cpu_count": os.cpu_count(),
                            "threads": torch.get_num_threads(),
                            "cuda": torch.cuda.get_device_name(0)
                            if torch.cuda.is_available() else None,
                            "host_allocator": _host_allocator or "the system's"}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    note_loadavg(info, "loadavg_start")
    return info


def note_loadavg(info: Dict[str, Any], key: str) -> None:
    """``info[key]`` = the 1-, 5- and 15-minute load averages, where the platform has them."""
    try:
        info[key] = list(os.getloadavg())
    except (AttributeError, OSError):
        pass


def doc_description(doc: str) -> str:
    """A command's ``--help`` description: its module docstring's first paragraph, without the
    reST markup (double backticks, ``:role:`` references)."""
    import re

    return re.sub(r":\w+:`([^`]+)`", r"\1", doc.split("\n\n")[0].replace("``", ""))


def peak_rss_bytes() -> Optional[int]:
    """The process's peak resident memory so far (None where the platform does not say)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)   # bytes on macOS, KiB else


def fmt(x: Optional[float]) -> str:
    return "  n/a" if x is None else f"{x:5.3f}"
