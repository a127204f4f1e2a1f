"""``ultraedit run --save-state DIR`` / ``--resume DIR``: a lifelong run that saves its state
after every turn, and continues a stopped one from its last finished turn.

The state (``UltraEditor.save_state``) carries a ``meta`` record of the run: the sha256 of its
records (``EditRecord.to_dict()`` of every record, in order), ``--edits-per-turn``,
``--edit-wordings`` and ``--data``. A resumed run must select the same records in the same
turns, and takes the state's editing settings.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from ._common import UsageError

__all__ = ["check_state_options", "records_digest", "check_resumed_run", "run_meta"]


def check_state_options(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    """``--save-state``/``--resume`` before any work: the folder to save to may hold only a
    state; the state to resume is one (its manifest, returned), saved
    with deltas, and no editing option competes with its settings."""
    from pathlib import Path

    from ..checkpoint import read_state_manifest
    from ..serialization import StateError, check_replaceable
    from .options import given_options

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
                         f"{', '.join('--' + g.replace('_', '-') for g in given)}")
    return manifest


def records_digest(records) -> str:
    import hashlib
    import json

    text = json.dumps([r.to_dict() for r in records], sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_resumed_run(args, manifest: Dict[str, Any], records) -> None:
    """The run to resume edited these records in turns of this size: else a UsageError."""
    meta = manifest.get("meta") or {}
    if meta.get("records_sha256") is None:
        raise UsageError(f"--resume {args.resume!r}: the state was not saved by `ultraedit run "
                         f"--save-state`, so its records are unknown")
    if (meta.get("records_sha256"), meta.get("edits_per_turn"), meta.get("edit_wordings")) != \
            (records_digest(records), args.edits_per_turn, args.edit_wordings):
        raise UsageError(f"--resume {args.resume!r}: the state was saved by a run over other "
                         f"records, --edits-per-turn or --edit-wordings (its data: "
                         f"{meta.get('data')!r}, {meta.get('edits_per_turn')} per turn, "
                         f"wordings {meta.get('edit_wordings')!r}); give the same ones")
    if manifest["turns"] > args.turns:
        raise UsageError(f"--resume {args.resume!r}: the state has made {manifest['turns']} "
                         f"turns, more than --turns {args.turns}")


def run_meta(args: argparse.Namespace, records) -> Dict[str, Any]:
    """The ``meta`` a run's saved state carries (what :func:`check_resumed_run` compares)."""
    return {"records_sha256": records_digest(records), "edits_per_turn": args.edits_per_turn,
            "edit_wordings": args.edit_wordings, "data": args.data}
