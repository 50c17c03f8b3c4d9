"""Streaming vs in-memory merge of safetensors checkpoints: peak memory and throughput, measured in one run.

Writes a base and `--models` fine-tuned checkpoints (`--tensors` fp32 matrices of `--rows` x `--cols` each, so each
checkpoint is many tensors large) to a temporary folder, then merges them with TIES twice, each in a fresh child
process so peak RSS is its own:

* **stream**: `lablib.merging.merge_safetensors` (one tensor per input in memory, plain file reads, output appended
  tensor by tensor);
* **in-memory**: `safetensors.torch.load_file` of every checkpoint, `lablib.merging.ties`, `save_file`.

Peak RSS is `ru_maxrss` of the child minus its RSS after the imports (so torch's own footprint is left out);
GB/s counts bytes read plus written over the merge's wall time. The outputs are compared (must be equal) before the
table is printed. A benchmark, not a test: it exits 0 either way and prints ratios against the in-memory baseline.

    python bench/merge_stream.py [--models 3] [--tensors 16] [--rows 1024] [--cols 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from lablib import merging
from lablib.merging.streaming import merge_safetensors
from safetensors.torch import load_file, save_file

def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")

mode, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
start_rss = rss_mb()
models = [f"{folder}/m{i}.safetensors" for i in range(n)]
t0 = time.perf_counter()
if mode == "stream":
    report = merge_safetensors("ties", f"{folder}/base.safetensors", models, f"{folder}/out_stream.safetensors",
                               density=0.2)
    moved = report.bytes_read + report.bytes_written
else:
    base = load_file(f"{folder}/base.safetensors")
    states = [load_file(m) for m in models]
    merged = merging.ties(base, states, density=0.2)
    save_file(merged, f"{folder}/out_memory.safetensors")
    size = sum(v.numel() * v.element_size() for v in base.values())
    moved = size * (n + 2)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(mode=mode, seconds=seconds, peak_mb=peak - start_rss, moved=moved)))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=1024)
    args = parser.parse_args()

    import torch
    from safetensors.torch import load_file, save_file

    tensor_mb = args.rows * args.cols * 4 / 2**20
    with tempfile.TemporaryDirectory() as folder:
        g = torch.Generator().manual_seed(0)
        base = {f"layers.{i}.weight": torch.randn(args.rows, args.cols, generator=g) for i in range(args.tensors)}
        save_file(base, f"{folder}/base.safetensors")
        for m in range(args.models):
            save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                      f"{folder}/m{m}.safetensors")
        del base
        rows = {}
        for mode in ("in-memory", "stream"):
            out = subprocess.run([sys.executable, "-c", CHILD, mode, folder, str(args.models)], check=True,
                                 capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(
                                     Path(__file__).resolve().parent.parent)))
            rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        a, b = load_file(f"{folder}/out_stream.safetensors"), load_file(f"{folder}/out_memory.safetensors")
        equal = all(torch.equal(a[k], b[k]) for k in b)
    print(f"{args.models} models + base, {args.tensors} tensors of {tensor_mb:.0f} MB each "
          f"({args.tensors * tensor_mb:.0f} MB per checkpoint); outputs equal: {equal}; load {os.getloadavg()}")
    print(f"{'mode':>10} {'peak RSS MB':>12} {'seconds':>8} {'GB/s':>6} {'RSS ratio':>10}")
    for mode, r in rows.items():
        ratio = r["peak_mb"] / rows["in-memory"]["peak_mb"]
        print(f"{mode:>10} {r['peak_mb']:>12.0f} {r['seconds']:>8.2f} {r['moved'] / 1e9 / r['seconds']:>6.2f} "
              f"{ratio:>10.2f}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
