"""Fact keys and domain-free preserved subjects: the lifelong runs behind experiments/tuning.md,
"Edit quality that generalizes".

Every row is one `ultraedit run` on the offline facts (2 turns x 25 edits by default: what a
shared 2-core CPU allowed for a dozen runs in one session; the final evaluation over all edits, teacher-forced and WILD-style scores, no generation scores), the embedded
SmolLM2-135M preset with one or two options changed. The first run of a split writes its edit
records (`--records-out`); the others rerun on exactly them (`--format records`), so every row
of a split edits the same facts with the same locality prompts.

    python experiments/generalization.py run --split tuning --name tables --args "--preserve-subjects :tables"
    python experiments/generalization.py run --split tuning --name generic_kc4 --args "--key-contexts 4"
    python experiments/generalization.py table experiments/results/generalization_*.json

`run` writes experiments/results/generalization_<split>_<name>.json; `table` prints the
markdown rows of tuning.md from such files.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def run(split: str, name: str, extra: str, records_dir: Path, turns: int = 2,
        edits: int = 25) -> Path:
    out = RESULTS / f"generalization_{split}_{name}.json"
    records = records_dir / f"generalization_{split}.jsonl"
    data = (["--data", str(records), "--format", "records"] if records.is_file() else
            ["--data", "offline", "--split", split, "--records-out", str(records)])
    cmd = [sys.executable, "-m", "ultraedit.cli", "run", *data, "--turns", str(turns),
           "--edits-per-turn", str(edits), "--eval", "end", "--no-generation", "--threads", "1",
           "--no-progress", "--json", str(out), *shlex.split(extra)]
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'python'}",
               OMP_NUM_THREADS="1")
    print(" ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return out


def row(path: Path) -> str:
    res = json.loads(Path(path).read_text())
    tf, wild = res["final"]["teacher_forced"], res["final"].get("wild") or {}
    ec = res["edit_config"]
    turns = res["turns"]
    per_turn = sum(t["turn_s"] for t in turns) / len(turns)
    editor = sum(t["editor_s"] for t in turns) / len(turns)
    subjects = ec.get("preserve_subjects") or [":generic (default)"]
    label = (f"{','.join(subjects)[:30]}, μ = {ec.get('preserve')}, "
             f"key_contexts={ec.get('key_contexts', 0)}")
    fmt = lambda d, k: "-" if d.get(k) is None else f"{d[k]:.3f}"  # noqa: E731
    return (f"| {Path(path).stem} | {label} | {len(turns)} x {turns[0]['edits']} | "
            f"{fmt(tf, 'es')} / {fmt(tf, 'gs')} / {fmt(tf, 'ls')} | "
            f"{fmt(wild, 'es')} / {fmt(wild, 'gs')} / {fmt(wild, 'ls')} | {per_turn:.1f} s "
            f"({editor:.1f} s editor) | "
            f"{res.get('timing', {}).get('preserve_s', 0) or 0:.1f} s |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--split", choices=("tuning", "report"), required=True)
    r.add_argument("--name", required=True)
    r.add_argument("--args", default="", help="extra `ultraedit run` flags")
    r.add_argument("--records-dir", type=Path, default=RESULTS)
    r.add_argument("--turns", type=int, default=2)
    r.add_argument("--edits-per-turn", type=int, default=25)
    t = sub.add_parser("table")
    t.add_argument("files", nargs="+", type=Path)
    a = p.parse_args(argv)
    if a.cmd == "run":
        print(row(run(a.split, a.name, a.args, a.records_dir, a.turns, a.edits_per_turn)))
    else:
        print("| run | preserved subjects, fact keys | turns x edits | TF ES / GS / LS | "
              "WILD ES / GS / LS | time per turn | preserved keys |")
        print("|---|---|---|---|---|---|---|")
        for f in a.files:
            print(row(f))


if __name__ == "__main__":
    main()
