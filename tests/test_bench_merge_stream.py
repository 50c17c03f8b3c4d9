"""bench/merge_stream.py runs end to end on tiny checkpoints and finds streaming and in-memory outputs equal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("safetensors")
BENCH = Path(__file__).resolve().parent.parent / "bench" / "merge_stream.py"


def test_bench_runs_and_outputs_agree():
    out = subprocess.run([sys.executable, str(BENCH), "--models", "2", "--tensors", "3", "--rows", "32", "--cols", "16"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "outputs equal: True" in out.stdout
    assert "stream" in out.stdout and "in-memory" in out.stdout
