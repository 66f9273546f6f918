"""The one command left to take the GPU numbers of issue 12 runs: its code path end to end, small,
on the CPU (``--device cpu``), so it does not first fail on the day a GPU is lent."""
import json
import subprocess
import sys

import pytest
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # over 15 s on 2 cores; CI runs it (-m 'not slow' leaves it out)
def test_the_gpu_benchmark_runs_its_code_path_on_the_cpu():
    command = [sys.executable, "-m", "bench.bench_feed", "--gpu", "--device", "cpu", "--model", "gemtest-micro",
               "--depth", "3", "--input-size", "128", "--gpu-batches", "2", "4", "--gpu-images", "8", "--shards", "2",
               "--threads", "1", "--decode-threads", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report["model_only"]) == {"fast-b2", "fast-b4", "naive-b2", "naive-b4"}
    assert all(rate > 0 for rate in report["model_only"].values())
    assert set(report["end_to_end"]) == {"cpu-decode-b2", "cpu-decode-b4"}  # GPU decode only on CUDA
    for run in report["end_to_end"].values():
        assert run["img_s"] > 0 and 0 < run["of_model_only"]
        assert {"decode_s", "model_s", "postprocess_s", "rle_s", "write_s"} <= set(run["timings"])
