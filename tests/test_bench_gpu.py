"""`benchmarks/bench_gpu.py --tiny` runs every code path of the GPU benchmark on the CPU, so it does not rot."""

import os
import subprocess
import sys

from conftest import REPO_ROOT


def test_bench_gpu_tiny_runs_every_row():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    script = REPO_ROOT / "benchmarks" / "bench_gpu.py"
    out = subprocess.run(
        [sys.executable, str(script), "--tiny"], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "assumed peak: 790 TFLOP/s" in out
    for mode in ("eager", "compiled"):
        for name in ("ours order 1", "ours order 2 logsnr", "stock DDIMPipeline", "bare UNet loop"):
            assert f"{name}, {mode}" in out
        for name in ("ours", "train_unconditional"):
            assert f"  {name}, {mode}" in out
    assert "/stock same mode" in out and "/train_unconditional same mode" in out
