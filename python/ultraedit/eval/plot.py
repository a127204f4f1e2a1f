"""A PNG of a lifelong run: per-turn teacher-forced scores (and WILD-style ones, dashed), the
final scores over all edits (teacher-forced, generation, WILD-style), the unedited model's GS on
the true answers (dotted, when scored), and the time per turn split into the model's
forward+backward and the editor's own work."""

from __future__ import annotations

import os
from typing import Any, Dict

__all__ = ["plot_format", "plot_run"]

_KIND = {"teacher_forced": "teacher-forced", "generation": "generation", "wild": "WILD-style"}


def plot_run(result: Dict[str, Any], path: str) -> None:
    """PNG of the per-turn metrics (and the final ones) and the time per turn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.get("turns", [])
    x = [r["turn"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    colors = {"es": "tab:blue", "gs": "tab:orange", "ls": "tab:green", "pt": "tab:purple"}
    for kind, style, what in (("teacher_forced", "o-", ""), ("wild", "s--", ", WILD-style")):
        for k, c in colors.items():
            pts = [(r["turn"], r["metrics"][kind][k]) for r in rows
                   if r.get("metrics") and (r["metrics"].get(kind) or {}).get(k) is not None]
            if pts:
                ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, color=c,
                         label=f"{k.upper()} (turn's edits{what})")
    final = result.get("final") or {}
    last = max(x) if x else 1
    for kind, marker, dx in (("teacher_forced", "*", 0.2), ("generation", "x", 0.3),
                             ("wild", "D", 0.4)):
        sc = final.get(kind) or {}
        for k, c in colors.items():
            if sc.get(k) is not None:
                ax1.plot([last + dx], [sc[k]], marker, color=c,
                         markersize=7 if marker == "D" else 11,
                         label=f"{k.upper()} final, all edits ({_KIND[kind]})")
    true = result.get("true_facts") or {}
    if true.get("gs") is not None:      # the yardstick: the unedited model's GS on true answers
        ax1.axhline(true["gs"], color=colors["gs"], linestyle=":", linewidth=1,
                    label="GS of the unedited model on the TRUE answers")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_ylabel("score")
    cfg = result.get("edit_config") or result.get("config") or {}
    run_cfg = result.get("config") or {}
    facts = (f"offline split {run_cfg.get('split') or 'all'}" if run_cfg.get("format") == "offline"
             else os.path.basename(str(run_cfg.get("data", ""))))
    ax1.set_title(f"ultraedit run: {result.get('edits', '?')} edits ({facts}), "
                  f"compat={cfg.get('compat')}, lr={cfg.get('lr')}, "
                  f"{len(cfg.get('modules', []))} modules", fontsize=10)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="lower left", ncol=2)
    if rows:
        fb = [r["fwd_bwd_s"] for r in rows]
        ed = [r["editor_s"] for r in rows]
        ax2.bar(x, fb, label="forward+backward", color="tab:gray")
        ax2.bar(x, ed, bottom=fb, label="editor", color="tab:red")
        ev = [r.get("eval_s") for r in rows]
        if any(v is not None for v in ev):
            ax2.plot(x, [v or 0 for v in ev], "s--", color="tab:blue", label="per-turn eval")
    from matplotlib.ticker import MaxNLocator

    ax2.xaxis.set_major_locator(MaxNLocator(integer=True))   # turns are whole numbers
    ax2.set_xlabel("turn")
    ax2.set_ylabel("seconds")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    from ..temporary import atomic_write

    with atomic_write(path, binary=True) as fh:
        fig.savefig(fh, dpi=100, format=plot_format(path))
    plt.close(fig)


def plot_format(path: str) -> str:
    """The image format of ``path``'s suffix; ``ValueError`` naming the ones matplotlib writes."""
    from matplotlib.figure import Figure

    supported = Figure().canvas.get_supported_filetypes()
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if fmt not in supported:
        raise ValueError(f"cannot write a plot as {fmt or 'a file without a suffix'!r}: give a "
                         f"file ending in one of {', '.join('.' + f for f in sorted(supported))}")
    return fmt
