"""ddpm.py's training speed beside w86763777/pytorch-ddpm's (the faithful PyTorch port), in one run.

    python tools/bench/bench_ddpm.py --peer ~/pytorch-ddpm                       # CPU, --arch small, batch 128
    python tools/bench/bench_ddpm.py --peer ~/pytorch-ddpm --arch cifar10 --device cuda \
        --configs none amp+channels-last+compile
    python tools/bench/bench_ddpm.py --arch cifar10 --device cuda                # ours alone (no checkout of the peer)

The same U-Net (ch, ch_mult, blocks, attention level, dropout 0.1; the parameter counts are printed), batch
and image size (3 x 32 x 32) on both sides. Ours runs as a user runs it (`ddpm.py --dataset synthetic-rgb
--image-size 32 ...`, the data on the device); its figure is the median images/s of its logged intervals
after the first. The peer runs its own `main.py --train` unchanged but for what the benchmark needs: the
device (its `cuda:0` is hard-coded), fake images of CIFAR-10's size through its own transforms and
DataLoader (torchvision's FakeData instead of the download), and a clock on its clip_grad_norm_ call,
made once per step, which ends the run after --steps steps; its figure is the batch over the median
interval between two calls, after the first --warmup steps. Configurations alternate within each round,
so that the load of a shared machine hits them alike.
"""
import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import ddpm  # noqa: E402

PEER = r"""
import os, statistics, sys, time
import torch, torchvision
peer, steps, warmup, device, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sys.argv = [sys.argv[0]] + sys.argv[6:]
sys.path.insert(0, peer)
import main                                               # the peer's main.py: its flags and train()
main.device = torch.device(device)
main.CIFAR10 = lambda root, train, download, transform: torchvision.datasets.FakeData(50000, (3, 32, 32), 10, transform)
stamps, clip = [], torch.nn.utils.clip_grad_norm_
def timed_clip(*args, **kwargs):                          # once per step, after its backward
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    stamps.append(time.perf_counter())
    if len(stamps) > steps:
        dt = statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))
        print(f"peer_images_per_s {batch / dt:.2f}", flush=True)
        os._exit(0)
    return clip(*args, **kwargs)
torch.nn.utils.clip_grad_norm_ = timed_clip
from absl import app
app.run(main.main)
"""


def ours(flags: str, a, out: Path) -> float:
    cmd = [sys.executable, str(ROOT / "ddpm.py"), "--dataset", "synthetic-rgb", "--image-size", "32", "--arch", a.arch,
           "--batch-size", str(a.batch_size), "--steps", str(a.steps), "--log-every", str(a.log_every),
           "--sample-every", "1000000000", "--ckpt-every", "1000000000", "--device", a.device, "--out", str(out),
           *flags.split()]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if not hasattr(a, "said"):
        print(proc.stdout.splitlines()[0], flush=True)   # the parameter count
        a.said = True
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    warmup = 2 if "--compile" in flags else 1
    return statistics.median(rates[warmup:-1] or rates[warmup:])


def peer(a, out: Path) -> float:
    ch, ch_mult, blocks = ddpm.ARCHS[a.arch]
    attn = ddpm.attention_level(ddpm.Config(dataset="synthetic-rgb", image_size=32, arch=a.arch))
    flags = ["--train", "--ch", str(ch), *[f"--ch_mult={m}" for m in ch_mult], f"--attn={attn}",
             "--num_res_blocks", str(blocks), "--dropout", "0.1", "--batch_size", str(a.batch_size),
             "--sample_step", "0", "--save_step", "0", "--eval_step", "0", "--logdir", str(out)]
    cmd = [sys.executable, "-c", PEER, str(Path(a.peer).resolve()), str(a.steps), str(a.warmup),
           a.device, str(a.batch_size), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(("peer_images_per_s", "Model params"))]
    if not any(line.startswith("peer_") for line in lines):
        raise SystemExit(f"the peer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if not hasattr(a, "peer_said"):
        print(f"peer: {lines[0]}  (its unit: 2^20 parameters)", flush=True)
        a.peer_said = True
    return float(lines[-1].split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", help="a checkout of w86763777/pytorch-ddpm (without it: ours alone)")
    p.add_argument("--arch", default="small", choices=tuple(ddpm.ARCHS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=128, help="the paper's")
    p.add_argument("--steps", type=int, default=12, help="training steps of each run")
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2, help="steps of the peer left out of its median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=["none", "amp"],
                   help="our flag sets, flags without dashes joined by + (default: %(default)s)")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for config in a.configs:
                flags = " ".join(f"--{f}" for f in config.split("+") if f != "none")
                name = flags or "(no flag)"
                results.setdefault(name, []).append(ours(flags, a, Path(tmp) / f"ours{r}-{config}"))
                print(f"round {r + 1}: ddpm.py {name}: {results[name][-1]:.1f} images/s", flush=True)
            if a.peer:
                results.setdefault("peer", []).append(peer(a, Path(tmp) / f"peer{r}"))
                print(f"round {r + 1}: peer: {results['peer'][-1]:.1f} images/s", flush=True)
    base = max(results["peer"]) if a.peer else None
    print(f"\nddpm --arch {a.arch}, 3x32x32, batch {a.batch_size}, {a.device}: best of {a.rounds} round(s)")
    for name, rates in results.items():
        ratio = f"  {max(rates) / base:.2f}x the peer" if base else ""
        print(f"  {name:<40s} {max(rates):8.1f} images/s{ratio}")


if __name__ == "__main__":
    main()
