"""fid.py against pytorch-fid, end to end on the CPU, and where fid.py's time goes.

Both compare the same two folders of 28x28 gray PNGs, Fashion-MNIST test images of classes 0-4 and
training images of classes 5-9 (two distributions, as generated and real images are: between two samples
of one distribution FID ~ 1 is a small difference of traces ~ 1000, which float64 itself determines to
~1e-5 only), with the same randomly initialised Inception weights (no download here: pytorch-fid's URL
loader is replaced by a read of the weights file, in this script only), each run as a user runs it: a new
process, default threads and decoding workers. The two commands alternate, best of --rounds each, so that
the load of a shared machine hits both alike; then the time of each stage is measured in this process.

    python tools/bench/bench_fid.py --n 2100 --rounds 1     # 2,100 images a side: full-rank 2048-d covariances
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
import common  # noqa: E402
import fid  # noqa: E402
from test_fid import random_inception_state  # noqa: E402  (the tests' weights: features of size ~1)

# pytorch-fid 0.3.0 calls scipy's sqrtm(A, disp=False), whose disp SciPy 1.18 removed (seen on the GPU machine):
# where it is gone, the call gets what disp=False returned, the root and an error estimate it does not use.
PYTORCH_FID = """import inspect, sys, scipy.linalg, torch, pytorch_fid.inception
weights = sys.argv.pop(1)
pytorch_fid.inception.load_state_dict_from_url = lambda *a, **k: torch.load(weights)
if "disp" not in inspect.signature(scipy.linalg.sqrtm).parameters:
    sqrtm = scipy.linalg.sqrtm
    scipy.linalg.sqrtm = lambda a, disp=True, **k: (sqrtm(a, **k), 0.0) if not disp else sqrtm(a, **k)
from pytorch_fid.fid_score import main
main()"""


def run(cmd: list) -> tuple[float, float]:
    """(wall seconds, FID printed) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return wall, float(re.search(r"(?:FID|fid):\s+(\S+)", proc.stdout).group(1))


def timed(fn, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per folder")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=50)
    a = p.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-fid-") as tmp:
        compare(Path(tmp), a)


def compare(tmp: Path, a) -> None:
    weights = tmp / "random-inception.pth"
    torch.save(random_inception_state(), weights)
    folders = []
    for split, classes in (("test", range(5)), ("train", range(5, 10))):
        images, labels = common.load_images("fashion-mnist", "data", split=split, labels=True)
        folder = tmp / split
        folder.mkdir()
        for i, image in enumerate(images[torch.isin(labels, torch.tensor(classes))][:a.n, 0].numpy()):
            Image.fromarray(image).save(folder / f"{i:06d}.png")
        folders.append(str(folder))

    # 1. End to end, in turns
    commands = {"pytorch-fid": [sys.executable, "-c", PYTORCH_FID, str(weights), *folders, "--device", "cpu",
                                "--dims", "2048", "--batch-size", str(a.batch_size)],
                "fid.py": [sys.executable, "fid.py", *folders, "--weights", str(weights), "--device", "cpu",
                           "--batch-size", str(a.batch_size)]}
    best, value = {}, {}
    for r in range(a.rounds):
        for name, cmd in commands.items():
            wall, value[name] = run(cmd)
            best[name] = min(best.get(name, float("inf")), wall)
            print(f"round {r + 1}: {name} {wall:.1f} s, FID {value[name]:.6f}", flush=True)
    diff = abs(value["fid.py"] - value["pytorch-fid"]) / value["pytorch-fid"]
    print(f"end to end, {2 * a.n} PNGs, best of {a.rounds}: pytorch-fid {best['pytorch-fid']:.1f} s, fid.py "
          f"{best['fid.py']:.1f} s ({best['pytorch-fid'] / best['fid.py']:.2f}x); |dFID|/FID = {diff:.1e} "
          f"(load average now {os.getloadavg()[0]:.2f})", flush=True)

    # 2. Where the time goes, stage by stage, in this process
    print("stages (best of 2):")
    for name, code in (("fid.py", "import fid"), ("pytorch-fid", "import pytorch_fid.fid_score")):
        print(f"  process start + imports, {name}: "
              f"{timed(lambda: subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)):.2f} s")
    files = sorted(Path(folders[0]).iterdir())[:a.batch_size]
    print(f"  decode {len(files)} PNGs (one thread): {timed(lambda: [fid._read_image(f) for f in files]):.3f} s")
    x = fid.to_uint8(torch.from_numpy(np.stack([fid._read_image(f) for f in files])).permute(0, 3, 1, 2))
    with torch.inference_mode():
        t = timed(lambda: F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False))
        print(f"  resize {len(files)} images to 299x299: {t:.3f} s")
        port = fid.FIDInceptionV3()
        port.load_state_dict(torch.load(weights))
        fid.load_inception.cache_clear()
        print(f"  read the weights and prepare the network: "
              f"{timed(lambda: fid.load_inception(str(weights), 'cpu'), repeats=1):.2f} s")
        for label, net in (("as pytorch-fid runs it (batch norm, N x C x H x W)", port.eval()),
                           ("as fid.py runs it (folded, channels-last)", fid.load_inception(str(weights), "cpu"))):
            t = timed(lambda: net(net.prepare(x)))
            print(f"  network with its resize, batch of {len(files)}, {label}: {t:.2f} s = "
                  f"{len(files) / t:.1f} images/s")
        profile(fid.load_inception(str(weights), "cpu"), x)


def profile(net, x) -> None:
    """The operators that take the time in fid.py's network."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        net(net.prepare(x))
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print("  fid.py's network by operator (self CPU time):")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:6]:
        print(f"    {e.key:32s} {100 * e.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    main()
