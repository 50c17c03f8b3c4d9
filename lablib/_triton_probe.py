"""Smoke test for the Triton interpreter: one tiny vector-add kernel, checked against numpy.

`python -m lablib doctor` runs this file in a subprocess with `TRITON_INTERPRET=1` (Triton has no CPU backend; the
interpreter executes kernels with numpy, which is how the kernel labs run on a laptop). A `@triton.jit` kernel must
live in a real `.py` file, which is why this is a module and not a `python -c` string.

Run it by hand with `TRITON_INTERPRET=1 python -m lablib._triton_probe`; it prints one line and exits 0 when the
kernel's output matches numpy, 1 otherwise.
"""

from __future__ import annotations

import os
import sys

# Must be set before the kernel below is decorated; the doctor sets it too, this keeps a manual run honest.
os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def _add_kernel(x_ptr, y_ptr, out_ptr, n_elements, BLOCK: tl.constexpr):
    program_id = tl.program_id(axis=0)
    offsets = program_id * BLOCK + tl.arange(0, BLOCK)
    # the last block runs past n_elements; the mask keeps it in bounds
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def main(*, n_elements: int = 1000, block: int = 256) -> int:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n_elements, generator=generator)
    y = torch.randn(n_elements, generator=generator)
    out = torch.empty_like(x)
    grid = (triton.cdiv(n_elements, block),)
    _add_kernel[grid](x, y, out, n_elements, BLOCK=block)
    expected = x.numpy() + y.numpy()
    max_abs_err = float(np.max(np.abs(out.numpy() - expected)))
    ok = max_abs_err <= 1e-6
    print(
        ("" if ok else "MISMATCH: ")
        + f"triton {triton.__version__} vector add of {n_elements} floats in {grid[0]} programs, "
        f"max |triton - numpy| = {max_abs_err:.1e} (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
