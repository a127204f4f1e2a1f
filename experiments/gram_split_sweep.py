"""How many runs of k the Triton Gram kernel should split a small Gram matrix into (GPU only).

For each (m, k, dtype) of a turn's key matrices (m keys of width k, rows layout), times the
kernel at every split count that leaves each program at least 256 of k, beside torch's
``X @ X.T + λI`` in the same process (medians of ``triton.testing.do_bench``), and prints one
JSON row per case: the times, the split the launcher's rule picks, and the best split.

    python experiments/gram_split_sweep.py > gram_split_sweep.json
"""
from __future__ import annotations

import json
import sys

import torch
import triton
import triton.testing

sys.path.insert(0, ".")
from ultraedit_kernels._triton import gram as mod  # noqa: E402


def torch_gram(x, ridge):
    xf = x.float()
    g = xf @ xf.T
    g.diagonal().add_(ridge)
    return g


def main():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    original = mod.choose_split
    for dtype in (torch.bfloat16, torch.float32):
        for m in (64, 100, 200, 400, 800, 1024, 2000):
            for k in (576, 1536, 4096, 14336):
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                block_m, block_k = mod.CONFIGS[mod.choose_config(m)][:2]
                rule = original(m, k, block_m, block_k, sms)
                t_torch = triton.testing.do_bench(lambda: torch_gram(x, 1.0), warmup=10, rep=40,
                                                   return_mode="median")
                times = {}
                for splits in (rule[0], 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
                    per = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
                    real = triton.cdiv(k, per)
                    if real in times or (real > 1 and per < 256):
                        continue
                    mod.choose_split = lambda *a, _s=real, _p=per: (_s, _p)
                    try:
                        times[real] = triton.testing.do_bench(
                            lambda: mod.gram_triton(x, 1.0, True), warmup=10, rep=40,
                            return_mode="median")
                    finally:
                        mod.choose_split = original
                best = min(times, key=times.get)
                print(json.dumps({"dtype": str(dtype), "m": m, "k": k, "sms": sms,
                                  "torch_ms": t_torch, "split_ms": times, "rule": rule[0],
                                  "best": best, "rule_ms": times.get(rule[0]),
                                  "best_ms": times[best]}), flush=True)


if __name__ == "__main__":
    main()
