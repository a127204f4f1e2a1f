"""``ultraedit run --save-state DIR`` / ``--resume DIR``: a lifelong run that saves its state
after every turn, and continues a stopped one from its last finished turn, or a finished one
with more turns.

The state (``UltraEditor.save_state``) carries a ``meta`` record of the run: the sha256 of the
records it has edited (``EditRecord.to_dict()`` of each, in order) and their number,
``--edits-per-turn``, ``--edit-wordings`` and ``--data``. A resumed run must start with the same
records in the same turns (it may have more turns), and takes the state's editing settings.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from ._common import UsageError

__all__ = ["check_state_options", "RecordsDigest", "records_digest", "check_resumed_run",
           "RunMeta"]


def check_state_options(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """``--save-state``/``--resume`` before any work: the folder to save to may hold only a
    state; the state to resume is one (its manifest, returned), saved
    with deltas, and no editing option competes with its settings."""
    from pathlib import Path

    from ..checkpoint import read_state_manifest
    from ..serialization import StateError, check_replaceable
    from .options import _flag, given_options

    if args.save_state:   # the outputs inside it: check_output_paths(out_dirs=)
        try:
            check_replaceable(Path(args.save_state), "state")
        except StateError as err:
            raise UsageError(f"--save-state: {err}") from None
    if not args.resume:
        return None
    try:
        manifest = read_state_manifest(args.resume)
    except StateError as err:
        raise UsageError(f"--resume: {err}") from None
    if not manifest.get("include_delta"):
        raise UsageError(f"--resume {args.resume!r}: the state was saved without its deltas; "
                         f"resume it from Python (UltraEditor.load_state onto the edited model)")
    given = sorted(given_options(args)) + (["preset"] if args.preset else [])
    if given:
        raise UsageError(f"--resume continues with the saved state's editing settings; drop "
                         f"{', '.join(map(_flag, given))}")
    return manifest


class RecordsDigest:
    """The sha256 of a sequence of records (one ``to_dict()`` JSON line each), kept up to date as
    records are added, so that a state saved after every turn hashes each record once."""

    def __init__(self, records=()):
        import hashlib

        self._hash, self.count = hashlib.sha256(), 0
        self.update(records)

    def update(self, records) -> None:
        import json

        for r in records:
            line = json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=True) + "\n"
            self._hash.update(line.encode())
            self.count += 1

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def records_digest(records) -> str:
    """The sha256 :class:`RecordsDigest` gives ``records``."""
    return RecordsDigest(records).hexdigest()


def _whole_run_digest(records) -> str:   # states saved before the digest covered edited records
    import hashlib
    import json

    text = json.dumps([r.to_dict() for r in records], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_resumed_run(args, manifest: Dict[str, Any], records) -> None:
    """The run to resume edited the first of these records in turns of this size: else a
    UsageError naming what differs."""
    meta = manifest.get("meta") or {}
    where = f"--resume {args.resume!r}: the state was saved by a run"
    if meta.get("edited_records_sha256") is None and meta.get("records_sha256") is None:
        raise UsageError(f"--resume {args.resume!r}: the state was not saved by `ultraedit run "
                         f"--save-state`, so its records are unknown")
    if meta.get("edits_per_turn") != args.edits_per_turn:
        raise UsageError(f"{where} with --edits-per-turn {meta.get('edits_per_turn')}; give the "
                         f"same")
    if meta.get("edit_wordings") != args.edit_wordings:
        raise UsageError(f"{where} with --edit-wordings {meta.get('edit_wordings')}; give the "
                         f"same")
    if manifest["turns"] > args.turns:
        raise UsageError(f"--resume {args.resume!r}: the state has made {manifest['turns']} "
                         f"turns, more than --turns {args.turns}")
    if meta.get("edited_records_sha256") is not None:
        edited = int(meta.get("edited_records", 0))
        same = (len(records) >= edited
                and records_digest(records[:edited]) == meta["edited_records_sha256"])
    else:   # an older state: its digest covers all of its run's records
        same = _whole_run_digest(records) == meta["records_sha256"]
    if not same:
        raise UsageError(f"{where} over other records (its data: {meta.get('data')!r}); this "
                         f"run must start with the records it edited, in the same order")


class RunMeta:
    """``meta(turn)``: the ``meta`` a run's state saved after ``turn`` carries (what
    :func:`check_resumed_run` compares): the digest of the records edited so far."""

    def __init__(self, args: argparse.Namespace, records):
        self.records, self.per_turn = list(records), args.edits_per_turn
        self.fixed = {"edits_per_turn": args.edits_per_turn,
                      "edit_wordings": args.edit_wordings, "data": args.data}
        self.digest = RecordsDigest()

    def __call__(self, turn: int) -> Dict[str, Any]:
        edited = min(turn * self.per_turn, len(self.records))
        self.digest.update(self.records[self.digest.count:edited])
        return {"edited_records_sha256": self.digest.hexdigest(), "edited_records": edited,
                **self.fixed}
