"""Where the paper's turn spends the time above its forward floor, and a compiled backbone.

On the embedded model, the 100 report edits of ``bench/bench_turn_official.py`` (7 x
``down_proj`` 22-28, ``EditConfig.official``, micro-batches of 10), one torch thread:

1. three turns with the backward's wall time (``Tensor.backward`` timed);
2. one turn under ``torch.profiler`` with the backward in a ``record_function`` range: the
   ops inside it by self CPU time;
3. the vocabulary projection's products alone (167 answer rows, 49152 x 576) in several
   layouts, and one layer's row-restricted input gradients as ten products of 17 rows against
   one of 167;
4. with ``--compile``: the ten micro-batches through the backbone without autograd, eager
   against ``torch.compile(model.model, dynamic=True)``, five alternating rounds, and the compile
   time (minutes).

    PYTHONPATH=.:python python experiments/official_turn_profile.py [--compile] --json OUT.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict

import _common  # noqa: F401  (the repository on sys.path)
import torch
from torch.profiler import ProfilerActivity, profile, record_function

MODULES = [f"model.layers.{i}.mlp.down_proj" for i in range(22, 29)]   # as bench_turn_official.py


def requests(n):
    from ultraedit.data import offline_facts

    return [{"prompt": r.prompt, "target": r.target} for r in offline_facts(split="report")[:n]]


def median_time(fn, loops=5, rounds=7):
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(loops):
            fn()
        times.append((time.perf_counter() - t) / loops)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from ultraedit import EditConfig, UltraEditor
    from ultraedit.models import load_model
    from ultraedit.turn import prepare_turn

    model, tok = load_model("default")
    reqs = requests(100)
    editor = UltraEditor(model, tok, config=EditConfig.official(modules=MODULES, lr=1e-6,
                                                                 micro_batch=10))

    def turn():
        if editor.journal.rollback_available:   # every turn from the unedited weights
            editor.rollback()
        return editor.edit(reqs)
    out = {"command": "python experiments/official_turn_profile.py " + " ".join(sys.argv[1:])}

    real_backward = torch.Tensor.backward
    seconds = {"backward": 0.0}

    def timed_backward(self, *args, **kwargs):
        t = time.perf_counter()
        with record_function("backward"):
            real_backward(self, *args, **kwargs)
        seconds["backward"] += time.perf_counter() - t

    torch.Tensor.backward = timed_backward
    try:
        out["turns"] = []
        for _ in range(3):
            seconds["backward"] = 0.0
            report = turn()
            out["turns"].append({"turn_s": report.turn_s, "fwd_bwd_s": report.fwd_bwd_s,
                                 "backward_s": seconds["backward"]})
            print(out["turns"][-1], flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            turn()
    finally:
        torch.Tensor.backward = real_backward
    span = next(e for e in prof.events() if e.name == "backward").time_range
    inside = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.name != "backward" and e.time_range.start >= span.start and e.time_range.end <= span.end:
            inside[e.name][0] += e.self_cpu_time_total / 1e3
            inside[e.name][1] += 1
    out["backward_ops_ms"] = {k: [round(v[0], 1), v[1]] for k, v in
                              sorted(inside.items(), key=lambda kv: -kv[1][0])[:30]}
    for k, (ms, calls) in list(out["backward_ops_ms"].items())[:15]:
        print(f"{ms:8.1f} ms {calls:6d}  {k}", flush=True)

    head = model.get_output_embeddings().weight.detach()
    x, g = torch.randn(167, head.shape[1]), torch.randn(167, head.shape[0])
    padded = torch.nn.functional.pad(x, (0, 0, 0, 9))
    xt = x.T.contiguous()
    out["head_ms"] = {name: round(1e3 * median_time(fn), 1) for name, fn in [
        ("x @ W.T", lambda: x @ head.T), ("(W @ x.T).T", lambda: (head @ x.T).T),
        ("W @ contiguous x.T", lambda: head @ xt),
        ("chunks of 4096", lambda: torch.cat([x @ w.T for w in head.split(4096)], 1)),
        ("padded to 176 rows", lambda: padded @ head.T), ("g @ W (backward)", lambda: g @ head)]}
    layer = model.model.layers[23]
    linears = [m.weight.detach() for m in (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                           layer.self_attn.v_proj, layer.self_attn.o_proj,
                                           layer.mlp.gate_proj, layer.mlp.up_proj,
                                           layer.mlp.down_proj)]

    def layer_grads(rows):
        grads = [torch.randn(rows, w.shape[0]) for w in linears]
        return lambda: [gr @ w for gr, w in zip(grads, linears)]
    out["layer_backward_ms"] = {"10 x 17 rows": round(1e4 * median_time(layer_grads(17)), 1),
                                "1 x 167 rows": round(1e3 * median_time(layer_grads(167)), 1)}
    print(out["head_ms"], out["layer_backward_ms"], flush=True)

    if a.compile:
        _, batches = prepare_turn(tok, reqs, EditConfig.official(), torch.device("cpu"), None)
        body = model.model
        compiled = torch.compile(body, dynamic=True)

        def run(net):
            with torch.no_grad():
                for b in batches:
                    net(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                        use_cache=False)
        t = time.perf_counter()
        run(compiled)
        out["compile_s"] = time.perf_counter() - t
        times = {"eager": [], "compiled": []}
        for _ in range(5):
            for name, net in (("eager", body), ("compiled", compiled)):
                t = time.perf_counter()
                run(net)
                times[name].append(time.perf_counter() - t)
        out["forward_s"] = {k: statistics.median(v) for k, v in times.items()}
        out["forward_times_s"] = times
        print(f"compile {out['compile_s']:.0f} s, forward {out['forward_s']}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
