"""Shared test settings."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter here, which must be on before anything imports triton (peft and
    # transformers do, when installed): set it for the whole session, before any test module is collected.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """The tests use tiny tensors: one thread is faster for them and immune to OpenMP spin contention when the
    machine is shared (two threads on a busy 2-core machine made tiny matmuls ~1000x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
