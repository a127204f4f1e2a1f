"""Per-call overhead of each public op (one-off measurement, before/after a change).

Runs ``bench/vs_torch.py``'s overhead section (each op at one row, 64 -> 64, against its plain
composition, alternating loops of calls) for the package found next to the given bench
directory, and prints JSON.  Before/after: run it from two checkouts in turn, e.g.::

    for i in 1 2 3; do
      PYTHONPATH=/tmp/orig python /tmp/orig/bench/../experiments/op_overhead.py  # (a copy)
      PYTHONPATH=. python experiments/op_overhead.py
    done
"""
import json
import os
import sys

import torch

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(root, "bench"))
sys.path.insert(0, root)

torch.set_num_threads(1)
import vs_torch  # noqa: E402

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
print(json.dumps({"package": vs_torch.uk.__file__, **vs_torch.run_overhead(rounds)}))
