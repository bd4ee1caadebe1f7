"""Training speed of a model script, flag by flag, beside its popular peer, measured in one run.

    python tools/bench/bench.py dcgan                                   # CPU: 64x64, batch 64
    python tools/bench/bench.py dcgan --peer ~/examples/dcgan/main.py   # with pytorch/examples' dcgan
    python tools/bench/bench.py dcgan --device cuda --batch-size 128 --peer ~/examples/dcgan/main.py
    python tools/bench/bench.py dcgan --configs none amp amp+channels-last   # some flag sets only

Each configuration runs the script itself, as a user does (`python dcgan.py --dataset synthetic-rgb
--image-size 64 ...`: the data held on the device as in any training run, no sample grids or
checkpoints), and its figure is the median images/s of the logged intervals after the warm-up ones
(the first, and with --compile the second, which compiles). The peer runs unchanged on its own fake
data (`main.py --dataset fake`), timed from the arrival of its per-iteration log lines: the median
over its full batches, epoch ends (image and model saving) excluded. Everything runs in one call, in
rounds, so that machine load hits every configuration alike.
"""
import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["none", "channels-last", "amp", "amp+channels-last", "amp+channels-last+compile"]  # flags joined by +


def ours(script: str, flags: str, a, out: Path) -> float:
    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", "synthetic-rgb", "--image-size", str(a.image_size),
           "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--log-every", str(a.log_every),
           "--sample-every", "1000000000", "--ckpt-every", "1000000000", "--device", a.device, "--out", str(out),
           *flags.split()]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    warmup = 2 if "--compile" in flags else 1
    return statistics.median(rates[warmup:-1] or rates[warmup:])  # the last interval may be shorter


def peer(main_py: str, a, out: Path) -> float:
    cmd = [sys.executable, "-u", main_py, "--dataset", "fake", "--batchSize", str(a.batch_size),
           "--imageSize", str(a.image_size), "--niter", "2", "--workers", str(a.peer_workers), "--outf", str(out)]
    if a.device != "cpu":
        cmd.append("--accel")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=out)
    stamps = []  # (epoch, iteration, arrival time) of each "[epoch/n][i/m] Loss_D ..." line
    for line in proc.stdout:
        if line.startswith("[") and "Loss_D" in line:
            head = line.split("]")
            epoch, i = int(head[0][1:].split("/")[0]), head[1][1:].split("/")
            stamps.append((epoch, int(i[0]), int(i[1]), time.perf_counter()))
    if proc.wait() != 0:
        raise SystemExit(f"the peer failed: {' '.join(cmd)}")
    # iteration i's line comes after its step; i - 1 -> i is one step. Skip the first 3 (warm-up) and
    # the last of each epoch (FakeData's 1000 images leave a partial batch, then the epoch's saving).
    times = [t1 - t0 for (e0, i0, n, t0), (e1, i1, _, t1) in zip(stamps, stamps[1:])
             if e0 == e1 and i1 == i0 + 1 and i0 >= 3 and i1 < n - 1]
    return a.batch_size / statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("script", help="dcgan (or gan)")
    p.add_argument("--peer", help="pytorch/examples' dcgan/main.py, run beside ours")
    p.add_argument("--peer-workers", type=int, default=2, help="its --workers (default: its own default, 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64, help="pytorch/examples' default (the paper: 128)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--configs", nargs="*", default=CONFIGS, help="flag sets to time, flags without their dashes "
                   "joined by + (default: %(default)s)")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for config in a.configs:
                flags = " ".join(f"--{f}" for f in config.split("+") if f != "none")
                out = Path(tmp) / f"run{r}-{config}"
                results.setdefault(flags or "(no flag)", []).append(ours(a.script, flags, a, out))
                print(f"round {r + 1}: {a.script}.py {flags or '(no flag)'}: {results[flags or '(no flag)'][-1]:.1f} "
                      f"images/s", flush=True)
            if a.peer:
                out = Path(tmp) / f"peer{r}"
                out.mkdir()
                results.setdefault("peer", []).append(peer(a.peer, a, out))
                print(f"round {r + 1}: peer: {results['peer'][-1]:.1f} images/s", flush=True)
    base = max(results["peer"]) if a.peer else None
    print(f"\n{a.script}.py, {a.image_size}x{a.image_size}, batch {a.batch_size}, {a.device}: "
          f"best of {a.rounds} round(s)")
    for name, rates in results.items():
        ratio = f"  {max(rates) / base:.2f}x the peer" if base else ""
        print(f"  {name:<40s} {max(rates):8.1f} images/s{ratio}")


if __name__ == "__main__":
    main()
