"""docs/anomaly-defects.png: eight Fashion-MNIST test images of one class, then the same images with each of
anomaly.py's seeded defects (cutpaste, scar, rect), a row each, as anomaly.py makes its test sets.

    python tools/figures/anomaly_defects.py --cls 7 --out docs/anomaly-defects.png
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import anomaly  # noqa: E402
import common  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--cls", type=int, default=7)
p.add_argument("--out", default="docs/anomaly-defects.png")
a = p.parse_args()
train, train_y = common.load_images("fashion-mnist", "data", labels=True)
test, test_y = common.load_images("fashion-mnist", "data", split="test", labels=True)
normal = test[test_y == a.cls]
rows = [normal[:8]] + [anomaly.defects(normal, kind, 0, train[train_y != a.cls])[0][:8] for kind in anomaly.DEFECTS]
x = torch.cat(rows).repeat_interleave(3, -1).repeat_interleave(3, -2)   # 3x, nearest: the pixels visible
common.save_grid(x, a.out, nrow=8, value_range=(0, 255))
print(f"wrote {a.out}")
