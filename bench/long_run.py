"""Lifelong long run on the embedded SmolLM2-135M: ``--turns`` x ``--edits`` offline edits.

Per turn it records the editor's ``TurnReport`` times, whether every edited weight is finite, and
at the end (and every ``--check-every`` turns) compares the editor's running statistics with an
independent float64 recomputation from every captured row (plain sums of ``z - c`` and
``(z - c)²`` per column, ``c`` = the first turn's column means, accumulated in float64 from the
rows the hooks captured). It also times ``save_state`` and a ``load_state`` round trip at the end.

    python bench/long_run.py                        # 100 turns x 100 edits = 10,000 edits, fp32
    python bench/long_run.py --turns 10 --edits 20 --out bench/out/long_run_small.json

The JSON (``--out``, rewritten atomically after every turn, so a partial run is usable) holds the
settings, the device, per-turn rows and a summary: median turn time of the first and last third,
their ratio, the least-squares slope of turn time against turn index, the largest relative
difference of the statistics from the float64 recomputation, and NaN/Inf counts.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "python")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402


class _Sums:
    """Independent float64 column sums of the captured rows ``z = [k ; g]`` per stats key."""

    def __init__(self):
        self.n = {}
        self.c = {}
        self.s1 = {}
        self.s2 = {}

    def add(self, key, z):
        z = z.double()
        if key not in self.c:
            self.c[key] = z.mean(0)
            self.n[key] = 0
            self.s1[key] = torch.zeros_like(self.c[key])
            self.s2[key] = torch.zeros_like(self.c[key])
        d = z - self.c[key]
        self.n[key] += z.shape[0]
        self.s1[key] += d.sum(0)
        self.s2[key] += (d * d).sum(0)

    def compare(self, stats):
        worst = {"mean": 0.0, "var": 0.0, "count_equal": True}
        for key, st in stats.items():
            n = self.n[key]
            mean = self.c[key] + self.s1[key] / n
            var = (self.s2[key] - self.s1[key] ** 2 / n) / (n - 1)
            worst["count_equal"] &= (st.count == n)
            scale_m = st.std.cpu().clamp_min(1e-30)
            err_m = float(((st.mean.cpu() - mean).abs() / scale_m).max())
            worst["mean"] = max(worst["mean"], err_m)
            worst["var"] = max(worst["var"], float(((st.var.cpu() - var).abs()
                                                     / var.abs().clamp_min(1e-30)).max()))
        return worst


def _write(path: Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=str(path.parent))
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def _slope(ys):
    n = len(ys)
    if n < 2:
        return 0.0
    xm, ym = (n - 1) / 2, statistics.fmean(ys)
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(n))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=100)
    ap.add_argument("--edits", type=int, default=100)
    ap.add_argument("--micro-batch", type=int, default=10)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--lr", type=float, default=None, help="default: the editor's measured lr")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--out", default=str(ROOT / "bench" / "out" / "long_run.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import ultraedit.editor as editor_mod
    from ultraedit import UltraEditor
    from ultraedit.data import offline_facts
    from ultraedit.hooks import CaptureSession
    from ultraedit.models import load_model

    model, tok = load_model("default", dtype=getattr(torch, args.dtype))
    records = offline_facts("all", seed=0, limit=args.turns * args.edits)
    if len(records) < args.turns * args.edits:
        raise SystemExit(f"only {len(records)} offline records for {args.turns * args.edits} edits")
    # the paper's method (one step at the answer positions): what the precision check is about
    ed = UltraEditor(model, tok, lr=args.lr, micro_batch=args.micro_batch, positions="answer",
                     steps=1, hold_done=False, memory=0.0, preserve=0.0)
    sums = _Sums()

    class Recording(CaptureSession):   # every captured (K, G) frame, as the editor pops them
        def pop_frames(self):
            frames = super().pop_frames()
            for frame in frames:
                for name, (k, g) in frame.items():
                    sums.add(ed.stats_key(name), torch.cat([k.cpu(), g.cpu()], 1))
            return frames

    editor_mod.CaptureSession = Recording
    out = Path(args.out)
    payload = {"settings": {**vars(args), "lr": ed.lr, "modules": list(ed.modules),
                            "accumulate": ed.journal.accumulate, "history": ed.journal.history,
                            "threads": torch.get_num_threads()},
               "device": f"{platform.processor() or platform.machine()}, "
                         f"{os.cpu_count()} CPUs, torch {torch.__version__}",
               "turns": [], "checks": []}
    t_run = time.perf_counter()
    for t in range(args.turns):
        reqs = [r.as_request() for r in records[t * args.edits:(t + 1) * args.edits]]
        rep = ed.edit(reqs)
        finite = all(bool(torch.isfinite(m.weight).all()) for m in ed.modules.values())
        payload["turns"].append({"turn": rep.turn, "turn_s": rep.turn_s, "fwd_bwd_s": rep.fwd_bwd_s,
                                 "editor_s": rep.editor_s, "n_tokens": rep.n_tokens,
                                 "loss": rep.loss, "finite": finite})
        if (t + 1) % args.check_every == 0 or t + 1 == args.turns:
            payload["checks"].append({"turn": t + 1, **sums.compare(ed.stats)})
        _write(out, payload)
        print(f"turn {rep.turn}: {rep.turn_s:.2f}s (fwd+bwd {rep.fwd_bwd_s:.2f}s) "
              f"tokens {rep.n_tokens} loss {rep.loss:.3f} finite {finite}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ed.save_state(Path(tmp) / "state")
        save_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "state").iterdir())
        base, _ = load_model("default", dtype=getattr(torch, args.dtype))
        t0 = time.perf_counter()
        ed2 = UltraEditor.load_state(Path(tmp) / "state", base, tok)
        load_s = time.perf_counter() - t0
        same = all(torch.equal(ed2.modules[n].weight, ed.modules[n].weight) for n in ed.modules)
        same &= all(torch.equal(ed2.stats[k].m2, ed.stats[k].m2) for k in ed.stats)

    times = [r["turn_s"] for r in payload["turns"]]
    third = max(1, len(times) // 3)
    first, last = statistics.median(times[:third]), statistics.median(times[-third:])
    payload["summary"] = {
        "edits": args.turns * args.edits, "wall_s": time.perf_counter() - t_run,
        "turn_s_median_first_third": first, "turn_s_median_last_third": last,
        "last_over_first": last / first, "turn_s_slope_per_turn": _slope(times),
        "nonfinite_turns": sum(not r["finite"] for r in payload["turns"]),
        "stats_vs_float64": payload["checks"][-1],
        "save_state_s": save_s, "state_bytes": size, "load_state_s": load_s,
        "load_state_roundtrip_exact": bool(same),
    }
    _write(out, payload)
    print(json.dumps(payload["summary"], indent=1))


if __name__ == "__main__":
    main()
