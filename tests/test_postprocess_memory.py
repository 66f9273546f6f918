"""Post-processing memory does not grow with the number of classes present (issue 7)."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A 48-megapixel label map where 200 classes are present (blocks of 300x400 pixels, some
# background): the peak of memory allocated during post-processing (tracemalloc sees numpy's
# buffers) and its wall time, in a fresh process.
SCRIPT = textwrap.dedent("""
    import json, time, tracemalloc
    import numpy as np
    import torch
    from gem.postprocess import RegionStats, class_regions
    height, width, classes = 6000, 8000, 200
    rows = (np.arange(height, dtype=np.int16) // 300)[:, None]
    cols = (np.arange(width, dtype=np.int16) // 400)[None, :]
    labels = np.empty((height, width), dtype=np.int16, order="F")
    np.remainder(rows * 20 + cols, classes, out=labels)
    labels[:50, :50] = -1
    accumulated = RegionStats(classes, width, torch.device("cpu"))  # counts, peaks, boxes, band by band
    for start in range(0, height, 500):
        band = torch.from_numpy(np.ascontiguousarray(labels[start:start + 500]))
        accumulated.add(start, torch.full(band.shape, 0.9), band)
    stats = accumulated.result()
    tracemalloc.start()
    start = time.perf_counter()
    regions = [(r.class_id, r.area, r.bbox, len(r.rle["counts"])) for r in class_regions(labels, stats)]
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    block = regions[7]
    print(json.dumps({"regions": len(regions), "extra_mb": peak / 2**20, "seconds": seconds,
                      "areas": sum(r[1] for r in regions), "block_7": [block[0], block[1], list(block[2])]}))
""")


def test_48_megapixels_with_200_classes_stay_within_a_few_hundred_mb():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["regions"] == 200 and measured["areas"] == 6000 * 8000 - 2500
    # class 7: blocks (row 0, col 7) and (row 10, col 7): x 2800..3199, y 0..299 and 3000..3299
    assert measured["block_7"] == [7, 2 * 300 * 400, [2800, 0, 400, 3300]]
    # One full-resolution bool mask per class would be 200 x 48 MB = 9.6 GB.
    assert measured["extra_mb"] < 400, measured
