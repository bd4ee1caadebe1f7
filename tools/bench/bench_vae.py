"""vae.py's training speed beside pytorch/examples' vae (`vae/main.py`), in one run.

    python tools/bench/bench_vae.py --peer ~/examples/vae/main.py               # CPU, batch 128, 784-400-20
    python tools/bench/bench_vae.py --peer ~/examples/vae/main.py --device cuda --rounds 3

Like with like: the same MLP sizes on both sides (784-400-20: ours with --hidden 400, 652,824 parameters
each, printed), the same batch (the peer's default, 128), the same 60,000 Fashion-MNIST training images.
What differs is each side's own recipe, kept as it is: ours has tanh units, Adagrad with its weight decay
and a fresh binarization of every batch (the paper's); the peer has ReLU units and Adam on grey levels.
Ours runs as a user runs it (`vae.py --hidden 400 --batch-size 128 ...`, the data held on the device).
The peer runs its own `main.py` unchanged but for what the benchmark needs: its `datasets.MNIST` opens
Fashion-MNIST's files from a temporary folder (the same idx format and class, so its own ToTensor transform
and DataLoader do the work they do on MNIST), `--no-accel` where the device is the CPU, and a clock on its
optimizer's step (called once per training step), which ends the run after --steps steps.
Images/s are counted the same way on both sides: batch x W steps over the wall time of W consecutive steps
(W = --window), the median over the windows after the first. Configurations alternate within each round,
so that the load of a shared machine hits them alike.
"""
import argparse
import csv
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

PEER = r"""
import os, runpy, statistics, sys, time
import torch, torchvision
main_py, data, steps, window, batch, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    int(sys.argv[5]), sys.argv[6]
sys.argv = [main_py] + sys.argv[7:]
torchvision.datasets.MNIST = lambda root, train=True, download=False, transform=None: \
    torchvision.datasets.FashionMNIST(data, train=train, transform=transform)
stamps, step = [], torch.optim.Adam.step
def timed_step(self, *args, **kwargs):                   # once per training step
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    if not stamps:
        print("peer:", sum(p.numel() for g in self.param_groups for p in g["params"]), "parameters", flush=True)
    stamps.append(time.perf_counter())
    if len(stamps) > steps:
        rates = [window * batch / (stamps[i + window] - stamps[i]) for i in range(0, steps - window + 1, window)]
        print(f"peer_images_per_s {statistics.median(rates[1:]):.2f}", flush=True)
        os._exit(0)
    return step(self, *args, **kwargs)
torch.optim.Adam.step = timed_step
runpy.run_path(main_py, run_name="__main__")
"""


def fashion_mnist_folder(tmp: Path) -> Path:
    """torchvision's layout (<root>/FashionMNIST/raw/*-ubyte) from the files common.py reads."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        src = common._find_idx("fashion-mnist", Path("data"), stem)
        if src is None:
            raise SystemExit(f"Fashion-MNIST's {stem} not found: apt-get install dataset-fashion-mnist")
        with (gzip.open(src) if src.suffix == ".gz" else open(src, "rb")) as f, open(raw / stem, "wb") as g:
            shutil.copyfileobj(f, g)
    return tmp


def ours(a, out: Path) -> float:
    cmd = [sys.executable, str(ROOT / "vae.py"), "--hidden", "400", "--nz", "20", "--batch-size", str(a.batch_size),
           "--steps", str(a.steps), "--log-every", str(a.window), "--sample-every", "1000000000",
           "--ckpt-every", "1000000000", "--device", a.device, "--out", str(out)]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if not hasattr(a, "said"):
        print(proc.stdout.splitlines()[0], flush=True)   # the parameter count
        a.said = True
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    return statistics.median(rates[1:])


def peer(a, data: Path, out: Path) -> float:
    flags = ["--batch-size", str(a.batch_size), "--epochs", "1"] + (["--no-accel"] if a.device == "cpu" else [])
    out.mkdir()
    cmd = [sys.executable, "-c", PEER, str(Path(a.peer).resolve()), str(data), str(a.steps), str(a.window),
           str(a.batch_size), a.device, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("peer_images_per_s", "peer:"))]
    if not any(line.startswith("peer_") for line in lines):
        raise SystemExit(f"the peer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if not hasattr(a, "peer_said"):
        print(lines[0], flush=True)
        a.peer_said = True
    return float(lines[-1].split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, help="pytorch/examples' vae/main.py")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128, help="the peer's default")
    p.add_argument("--steps", type=int, default=300, help="training steps of each run (an epoch is 468)")
    p.add_argument("--window", type=int, default=50, help="steps per timed window")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    results = {"vae.py": [], "peer": []}
    with tempfile.TemporaryDirectory() as tmp:
        data = fashion_mnist_folder(Path(tmp) / "data")
        for r in range(a.rounds):
            results["vae.py"].append(ours(a, Path(tmp) / f"ours{r}"))
            print(f"round {r + 1}: vae.py: {results['vae.py'][-1]:.1f} images/s", flush=True)
            results["peer"].append(peer(a, data, Path(tmp) / f"peer{r}"))
            print(f"round {r + 1}: peer: {results['peer'][-1]:.1f} images/s", flush=True)
    base = max(results["peer"])
    print(f"\nvae 784-400-20, batch {a.batch_size}, {a.device}: best of {a.rounds} round(s)")
    for name, rates in results.items():
        print(f"  {name:<10s} {max(rates):8.1f} images/s  {max(rates) / base:.2f}x the peer   (rounds: "
              + ", ".join(f"{v:.0f}" for v in rates) + ")")


if __name__ == "__main__":
    main()
