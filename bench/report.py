"""Turn pytest-benchmark JSON from ``bench/`` into a Markdown report and PNG plots.

    python bench/report.py bench/out/results.json [more.json ...] \
        --out-dir bench/out --markdown bench/RESULTS.md \
        --command "python -m pytest bench --benchmark-json=bench/out/results.json"

Writes (in ``--out-dir``): ``ops_time_vs_n.png`` and ``ops_memory_vs_n.png`` (7B shapes: time and
peak extra memory vs N, one panel per op, one line per backend and shape),
``ratio_vs_baseline.png`` (speedup and memory ratio of the per-turn cases against the paper
path). The Markdown (stdout, or ``--markdown``) holds the machine, the command, the "Must show"
checks and one table per suite. Plots use matplotlib's Agg backend (no display needed).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional

MiB = 2 ** 20


def load(paths: List[str]) -> Dict:
    """Merge several JSON files; the last one's machine_info/datetime win."""
    merged = {"benchmarks": [], "machine_info": {}, "commit_info": {}, "datetime": None, "runs": []}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        merged["benchmarks"].extend(data.get("benchmarks", []))
        merged["machine_info"] = data.get("machine_info", merged["machine_info"])
        merged["commit_info"] = data.get("commit_info", merged["commit_info"])
        merged["datetime"] = data.get("datetime", merged["datetime"])
        load_1m = data.get("machine_info", {}).get("ultraedit", {}).get("loadavg_1m")
        merged["runs"].append((os.path.basename(path), data.get("datetime"), load_1m))
    return merged


def _ms(seconds: Optional[float]) -> str:
    if seconds is None:
        return "–"
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.0f} µs"


def _spread(e: Dict, prefix: str = "") -> str:
    return f"{_ms(e.get(prefix + 'median_s'))} [{_ms(e.get(prefix + 'p20_s'))}–{_ms(e.get(prefix + 'p80_s'))}]"


def _mib(nbytes) -> str:
    return "–" if nbytes is None else f"{nbytes / MiB:.1f}"


def machine_lines(data: Dict) -> List[str]:
    mi = data.get("machine_info", {})
    ue = mi.get("ultraedit", {})
    lines = []
    if ue.get("gpu"):
        lines.append(f"- GPU: {ue['gpu']} (CUDA {ue.get('cuda')})")
    lines.append(f"- CPU: {ue.get('cpu_model') or mi.get('cpu', {}).get('brand_raw', '?')}, "
                 f"{ue.get('cpu_count', '?')} cores visible, torch threads {ue.get('torch_threads', '?')}")
    lines.append(f"- torch {ue.get('torch', '?')}, Python {ue.get('python', mi.get('python_version', '?'))}")
    for name, when, load_1m in data.get("runs", []):
        if load_1m is not None:
            lines.append(f"- `{name}`: written {when} (end of the run), 1-minute load average then {load_1m:.1f} on "
                         f"{ue.get('cpu_count', '?')} cores (other processes share them; see the caveats)")
    ci = data.get("commit_info", {})
    if ci.get("id"):
        lines.append(f"- commit {ci['id'][:12]}{' (dirty tree: other engineers were editing)' if ci.get('dirty') else ''}")
    return lines


def must_show_lines(benches: List[Dict]) -> List[str]:
    lines = []
    for b in benches:
        e = b.get("extra_info", {})
        if e.get("case") == "module_update":
            ok = "met" if e.get("must_show_met") else "NOT met"
            lines.append(
                f"- {e['d_in']} -> {e['d_out']} module, N = {e['n']}: **{e['speedup']:.1f}x** faster "
                f"than the paper path (need ≥ {e['must_speedup']:g}x), peak extra memory "
                f"{_mib(e['peak_bytes'])} MiB vs {_mib(e['paper_peak_bytes'])} MiB = "
                f"**{e['memory_ratio']:.3f}** of the baseline's (need ≤ {e['must_memory_ratio']}): {ok}")
        elif e.get("case") == "editor_turn":
            ok = "met" if e.get("must_show_met") else "NOT met"
            lines.append(
                f"- embedded model turn ({e['n_edits']} edits, N = {e['n']} answer tokens, "
                f"{e['n_modules']} modules): editor overhead **{100 * e['editor_overhead_fraction']:.1f}%** "
                f"of forward+backward (need ≤ {100 * e['must_overhead_fraction']:.0f}%): {ok}; paper-path turn "
                f"time / editor turn time = {e['speedup']:.2f}x")
    return lines


def turn_tables(benches: List[Dict]) -> List[str]:
    out = []
    mods = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("case") == "module_update"]
    if mods:
        out += ["### Per-module update (stats, pseudo-values, solve, in-place apply) vs the paper path", "",
                "median [p20–p80] of the rounds; peak = extra allocated bytes of one untimed run", "",
                "| module | N | this project | paper path | speedup | speedup w/o paper's disk I/O "
                "| peak MiB (project / paper) | memory ratio | project GFLOP/s | paper GFLOP/s | rounds |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for e in sorted(mods, key=lambda e: (e["d_in"], e["d_out"])):
            out.append(
                f"| {e['d_in']} -> {e['d_out']} | {e['n']} | {_spread(e)} | {_spread(e, 'paper_')} "
                f"| {e['speedup']:.1f}x | {e['speedup_excluding_paper_disk']:.1f}x "
                f"| {_mib(e['peak_bytes'])} / {_mib(e['paper_peak_bytes'])} | {e['memory_ratio']:.3f} "
                f"| {e['gflops']:.1f} | {e['paper_gflops']:.1f} | {e['rounds']} / {e['paper_rounds']} |")
        out.append("")
        out += ["Stage medians (s):", "",
                "| module | project: stats | factors (pseudo-values+Gram+Cholesky) | apply "
                "| paper: stats | disk | pseudo-values | solve (KᵀK, KᵀV, LU) | apply |",
                "|---|---|---|---|---|---|---|---|---|"]
        for e in sorted(mods, key=lambda e: (e["d_in"], e["d_out"])):
            g = lambda k: f"{e[k]:.3f}" if k in e else "–"  # noqa: E731
            out.append(f"| {e['d_in']} -> {e['d_out']} | {g('stage_stats_s')} | {g('stage_factors_s')} "
                       f"| {g('stage_apply_s')} | {g('paper_stage_stats_s')} | {g('paper_stage_disk_s')} "
                       f"| {g('paper_stage_pseudo_values_s')} | {g('paper_stage_solve_s')} "
                       f"| {g('paper_stage_apply_s')} |")
        out.append("")
    turns = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("case") == "editor_turn"]
    for e in turns:
        out += [f"### Editor turn on the embedded model ({e['model']})", "",
                f"{e['n_edits']} edits in micro-batches of {e['micro_batch']}, N = {e['n']} answer tokens, "
                f"{e['n_modules']} modules ({e['modules']}), lr {e['lr']:g}", "",
                "| path | turn | forward+backward | everything else | overhead / fwd+bwd | peak MiB |",
                "|---|---|---|---|---|---|",
                f"| UltraEditor | {_spread(e)} | {_spread(e, 'fwd_bwd_')} | {_spread(e, 'editor_overhead_')} "
                f"| {100 * e['editor_overhead_fraction']:.1f}% | {_mib(e['peak_bytes'])} |",
                f"| paper path | {_spread(e, 'paper_')} | {_spread(e, 'paper_fwd_bwd_')} "
                f"| {_spread(e, 'paper_overhead_')} | {100 * e['paper_overhead_fraction']:.1f}% "
                f"| {_mib(e['paper_peak_bytes'])} |", "",
                f"Paper-path turn time / editor turn time: {e['speedup']:.2f}x (above 1: the editor is faster); "
                f"peak extra memory editor / paper: {e['memory_ratio']:.3f}. "
                f"The editor's forward+backward is its own (`TurnReport.fwd_bwd_s`: no weight gradients, "
                f"logits only at answer columns); the paper's includes weight `.grad` and full logits.", ""]
    return out


def ops_table(benches: List[Dict]) -> List[str]:
    ops = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("suite") == "ops"]
    if not ops:
        return []
    ref = {(e["op"], e["d_in"], e["d_out"], e["n"]): e["median_s"] for e in ops if e["backend"] == "torch"}
    out = ["### Per-op (median [p20–p80]; GFLOP/s and GB/s from the cost model at the median)", "",
           "| op | backend | d_in -> d_out | N | time | vs torch | peak MiB | GFLOP/s | GB/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    order = ["stats_update", "stats_update2", "pseudo_values", "gram", "spd_solve", "apply_shift"]
    for e in sorted(ops, key=lambda e: (order.index(e["op"]) if e["op"] in order else 99,
                                        e["d_in"], e["d_out"], e["n"], e["backend"])):
        base = ref.get((e["op"], e["d_in"], e["d_out"], e["n"]))
        vs = f"{base / e['median_s']:.2f}x" if base else "–"
        out.append(f"| {e['op']} | {e['backend']} | {e['d_in']} -> {e['d_out']} | {e['n']} | {_spread(e)} "
                   f"| {vs} | {_mib(e['peak_bytes'])} | {e['gflops']:.1f} | {e['gbps']:.2f} |")
    out.append("")
    return out


def plots(benches: List[Dict], out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    written = []
    ops = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("suite") == "ops"]
    op_names = [o for o in ("stats_update", "stats_update2", "pseudo_values", "gram", "spd_solve", "apply_shift")
                if any(e["op"] == o for e in ops)]
    for key, label, fname, scale in (("median_s", "median time (s)", "ops_time_vs_n.png", 1.0),
                                     ("peak_bytes", "peak extra memory (MiB)", "ops_memory_vs_n.png", 1 / MiB)):
        if not op_names:
            break
        cols = min(3, len(op_names))
        rows = (len(op_names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
        flat = [ax for row in axes for ax in row]
        for ax in flat[len(op_names):]:
            ax.axis("off")
        for ax, op in zip(flat, op_names):
            series = defaultdict(list)
            for e in ops:
                if e["op"] == op:
                    series[(e["backend"], f"{e['d_in']}->{e['d_out']}")].append((e["n"], e[key] * scale))
            for (backend, shape), pts in sorted(series.items()):
                pts.sort()
                if len(pts) < 2:   # single-N shapes (the embedded model) as points
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"{backend} {shape}", marker="x")
                else:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend} {shape}")
            ax.set_title(op)
            ax.set_xlabel("N (answer tokens)")
            ax.set_ylabel(label)
            ax.set_xscale("log")
            if key == "median_s":
                ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    turns = [b["extra_info"] for b in benches if b.get("extra_info", {}).get("suite") == "turn"]
    if turns:
        labels, speed, mem, need = [], [], [], []
        for e in turns:
            if e["case"] == "module_update":
                labels.append(f"module {e['d_in']}->{e['d_out']}\nN={e['n']}")
                need.append(e.get("must_speedup"))
            else:
                labels.append(f"editor turn\n{e['n_edits']} edits")
                need.append(None)
            speed.append(e["speedup"])
            mem.append(e["memory_ratio"])
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
        xs = range(len(labels))
        ax1.bar(xs, speed, color="tab:blue")
        for x, s, n in zip(xs, speed, need):
            ax1.text(x, s, f"{s:.1f}x", ha="center", va="bottom")
            if n:
                ax1.hlines(n, x - 0.4, x + 0.4, colors="red", linestyles="--")
        ax1.set_xticks(list(xs), labels, fontsize=8)
        ax1.set_ylabel("speedup vs paper path (x)")
        ax1.set_yscale("log")
        ax1.set_title("time ratio (red: required)")
        ax2.bar(xs, mem, color="tab:green")
        for x, m in zip(xs, mem):
            ax2.text(x, m, f"{m:.3f}", ha="center", va="bottom")
        for x, e in zip(xs, turns):
            if e.get("must_memory_ratio"):
                ax2.hlines(e["must_memory_ratio"], x - 0.4, x + 0.4, colors="red", linestyles="--")
        ax2.set_xticks(list(xs), labels, fontsize=8)
        ax2.set_ylabel("peak extra memory / paper's")
        ax2.set_title("memory ratio (red: 1/4)")
        fig.tight_layout()
        path = os.path.join(out_dir, "ratio_vs_baseline.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def render(data: Dict, command: Optional[str], images: List[str], md_dir: str) -> str:
    benches = data["benchmarks"]
    lines = ["# Benchmark results", "",
             f"Generated by `bench/report.py` on {_dt.datetime.now().strftime('%Y-%m-%d %H:%M')}.", "",
             "## Machine", ""] + machine_lines(data) + [""]
    if command:
        lines += ["## Command", "", "```", command, "```", ""]
    must = must_show_lines(benches)
    if must:
        lines += ["## Targets", ""] + must + [""]
    lines += ["## Per turn", ""] + turn_tables(benches)
    lines += ops_table(benches)
    if images:
        lines += ["## Plots", ""]
        for img in images:
            rel = os.path.relpath(img, md_dir or ".")
            lines.append(f"![{os.path.basename(img)}]({rel})")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON file(s)")
    parser.add_argument("--out-dir", default="bench/out", help="where the PNG plots go")
    parser.add_argument("--markdown", default=None, help="write the Markdown here (default: stdout)")
    parser.add_argument("--command", default=None, help="the command that produced the JSON")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--append", default=None, help="a Markdown file appended verbatim (notes)")
    args = parser.parse_args(argv)
    data = load(args.json)
    images = [] if args.no_plots else plots(data["benchmarks"], args.out_dir)
    md_dir = os.path.dirname(os.path.abspath(args.markdown)) if args.markdown else os.getcwd()
    text = render(data, args.command, images, md_dir)
    if args.append:
        with open(args.append) as fh:
            text += "\n" + fh.read()
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
