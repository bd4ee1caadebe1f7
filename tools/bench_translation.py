"""pix2pix.py's and cyclegan.py's training speed beside the official implementation's, in one run.

    python tools/bench_translation.py --peer /tmp/peers/pytorch-CycleGAN-and-pix2pix           # CPU, 128 x 128, batch 1
    python tools/bench_translation.py --peer ~/pytorch-CycleGAN-and-pix2pix --device cuda --image-size 256 \
        --configs none amp+channels-last amp+channels-last+compile

The official implementation is junyanz/pytorch-CycleGAN-and-pix2pix (a checkout of it: --peer). Both sides
train the paper's networks at the same size and batch: pix2pix's U-Net with log2(size) levels (the official
unet_128 at 128, unet_256 at 256) and 70 x 70 PatchGAN, batch norm, dropout, BCE loss; CycleGAN's
resnet_9blocks and PatchGAN pairs, instance norm, LSGAN, pools of 50; RGB images; the parameter counts of
both sides are printed. Ours runs as a user runs it (`pix2pix.py --dataset aligned` on a folder of random A|B
images written here, `cyclegan.py --dataset unaligned` on trainA/ and trainB/ ones: its data path, with the
resize-and-crop jitter, is in the measurement); its figure is the median images/s of its logged intervals
after the first. The peer runs its own model class (models.create_model with its own option parser: the
networks, losses, optimizers, pools and optimize_parameters, unchanged), fed random tensors of the same size
through its set_input instead of its DataLoader (which would add its per-image PIL work to its time); its
figure is the batch over the median time of optimize_parameters after --warmup steps. Configurations
alternate within each round, so that the load of a shared machine hits them alike; the best of the rounds is
reported.
"""
import argparse
import csv
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

PEER = r"""
import statistics, sys, time
import torch
peer, model_name, size, batch, steps, warmup, device, checkpoints = sys.argv[1:9]
size, batch, steps, warmup = int(size), int(batch), int(steps), int(warmup)
sys.path.insert(0, peer)
from options.train_options import TrainOptions   # the peer's own parser, defaults and model options
from models import create_model
net_G = {"pix2pix": f"unet_{size}", "cycle_gan": "resnet_9blocks"}[model_name]
sys.argv = [sys.argv[0], "--dataroot", "unused", "--name", "bench", "--model", model_name, "--netG", net_G,
            "--checkpoints_dir", checkpoints, "--gpu_ids", "0" if device.startswith("cuda") else "-1",
            "--batch_size", str(batch), "--load_size", str(size), "--crop_size", str(size), "--display_id", "-1"]
opt = TrainOptions().parse()
model = create_model(opt)
model.setup(opt)
for name in model.model_names:
    net = getattr(model, "net" + name)
    print(f"peer_parameters {name} {sum(p.numel() for p in net.parameters())}", flush=True)
times = []
for step in range(steps):
    data = {"A": torch.rand(batch, 3, size, size) * 2 - 1, "B": torch.rand(batch, 3, size, size) * 2 - 1,
            "A_paths": ["a"] * batch, "B_paths": ["b"] * batch}
    model.set_input(data)
    t0 = time.perf_counter()
    model.optimize_parameters()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
print(f"peer_images_per_s {batch / statistics.median(times[warmup:]):.3f}", flush=True)
"""


def write_data(script: str, folder: Path, size: int, n: int = 8) -> None:
    """A few random RGB images in the official format: A|B pairs (pix2pix) or trainA/, trainB/ (cyclegan)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    if script == "pix2pix":
        (folder / "train").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, 2 * size, 3), dtype=np.uint8)).save(folder / "train" / f"{i}.png")
    else:
        for side in "AB":
            (folder / f"train{side}").mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                    folder / f"train{side}" / f"{i}.png")


def ours(script: str, flags: str, a, data: Path, out: Path) -> float:
    dataset = "aligned" if script == "pix2pix" else "unaligned"
    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", dataset, "--data-root", str(data),
           "--image-size", str(a.image_size), "--load-size", str(a.image_size * 286 // 256), "--batch-size",
           str(a.batch_size), "--steps", str(a.steps), "--log-every", str(a.log_every), "--sample-every", "1000000000",
           "--ckpt-every", "1000000000", "--device", a.device, "--out", str(out), *flags.split()]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if not getattr(a, f"said_{script}", False):
        print(f"ours: {proc.stdout.splitlines()[0]}", flush=True)   # the parameter counts
        setattr(a, f"said_{script}", True)
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    warmup = 2 if "--compile" in flags else 1
    return statistics.median(rates[warmup:-1] or rates[warmup:])


def peer(script: str, a, out: Path) -> float:
    model = {"pix2pix": "pix2pix", "cyclegan": "cycle_gan"}[script]
    cmd = [sys.executable, "-c", PEER, str(Path(a.peer).resolve()), model, str(a.image_size), str(a.batch_size),
           str(a.steps), str(a.warmup), a.device, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("peer_")]
    if not any(line.startswith("peer_images_per_s") for line in lines):
        raise SystemExit(f"the peer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if not getattr(a, f"peer_said_{script}", False):
        print("peer: " + ", ".join(" ".join(line.split()[1:]) for line in lines[:-1]), flush=True)
        setattr(a, f"peer_said_{script}", True)
    return float(lines[-1].split()[1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix")
    p.add_argument("--scripts", nargs="*", default=["pix2pix", "cyclegan"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=128, help="128 or 256 (the official U-Nets' sizes)")
    p.add_argument("--batch-size", type=int, default=1, help="the papers'")
    p.add_argument("--steps", type=int, default=16, help="training steps of each run")
    p.add_argument("--log-every", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3, help="steps of the peer left out of its median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=["none"],
                   help="our flag sets, flags without dashes joined by + (default: %(default)s)")
    a = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for script in a.scripts:
            write_data(script, Path(tmp) / f"data-{script}", a.image_size)
        for r in range(a.rounds):
            for script in a.scripts:
                for config in a.configs:
                    flags = " ".join(f"--{f}" for f in config.split("+") if f != "none")
                    name = (script, flags or "(no flag)")
                    out = Path(tmp) / f"ours-{script}-{r}-{config}"
                    results.setdefault(name, []).append(ours(script, flags, a, Path(tmp) / f"data-{script}", out))
                    print(f"round {r + 1}: {script}.py {name[1]}: {results[name][-1]:.3f} images/s", flush=True)
                out = Path(tmp) / f"peer-{script}-{r}"
                out.mkdir()
                results.setdefault((script, "peer"), []).append(peer(script, a, out))
                print(f"round {r + 1}: {script} peer: {results[(script, 'peer')][-1]:.3f} images/s", flush=True)
    print(f"\n{a.image_size}x{a.image_size}, batch {a.batch_size}, {a.device}: best of {a.rounds} round(s)")
    for script in a.scripts:
        base = max(results[(script, "peer")])
        for (s, name), rates in results.items():
            if s == script:
                print(f"  {script:<9s} {name:<40s} {max(rates):8.3f} images/s  {max(rates) / base:.2f}x the peer")


if __name__ == "__main__":
    main()
