"""Training speed of wgan.py and wgan_gp.py beside eriklindernoren/PyTorch-GAN's wgan and wgan_gp, in one run;
and what wgan_gp.py's batching of the critic calls buys.

    python tools/bench/bench_wgan.py --peer ~/PyTorch-GAN/implementations --rounds 2    # CPU, 28 x 28, batch 64
    python tools/bench/bench_wgan.py --peer ~/PyTorch-GAN/implementations --device cuda --configs none amp+channels-last
    python tools/bench/bench_wgan.py --device cuda --data-root fmnist/    # ours alone; Fashion-MNIST's files in fmnist/
    python tools/bench/bench_wgan.py --critic-calls --rounds 3    # wgan_gp's critic iteration, 1, 2 or 3 calls

Side by side: the peer at its defaults (an MLP generator and critic at 28 x 28 x 1, batch 64, n_critic 5;
wgan: RMSprop 5e-5 and clipping 0.01, wgan_gp: Adam 2e-4, betas (0.5, 0.999), lambda 10) and ours at the
same image size, batch and n_critic, with our default networks (the DCGAN convolutional ones: another,
heavier model than the peer's MLP) and our 100-critic-iteration burst off (--no-critic-burst), so that
every generator iteration has 5 critic iterations on both sides. Both train on Fashion-MNIST's 60,000
training images: ours as a user runs it (`wgan.py --image-size 28 ...`, the data held on the device), the
peer unchanged but for its dataset (torchvision's MNIST class swapped for FashionMNIST on the same files
through its own transforms and DataLoader) and a clock on its print, which it calls once per generator
iteration. The figure on both sides: generator iterations x 64 per second (the critic sees 5 real batches
for each), the median over logged intervals after the warm-up. Ours and the peer alternate within each round,
so that the load of a shared machine hits them alike.

--critic-calls times wgan_gp's critic iteration (Algorithm 1, lines 4-9) in this process (Fashion-MNIST 28 x 28,
batch 64, the default networks) with D(x), D(x~), D(x^) from 1 call (on cat(x, x~, x^)), 2 calls (cat(x, x~),
then x^: what wgan_gp.train_step does) or 3 calls, alternating, and reports the median images/s of each. The
three give the same numbers (the critic has no batch statistics); the one-call form runs the penalty's inner
and double backward over all 3m rows instead of m.
"""
import argparse
import csv
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

PEER = r"""
import os, runpy, statistics, sys, time
import torch, torchvision
script, steps, warmup, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sys.argv = [script]                                      # the peer at its defaults
def fashion_mnist(_root, train=True, download=False, transform=None):   # the same images as ours
    return torchvision.datasets.FashionMNIST(root, train=train, download=False, transform=transform)
torchvision.datasets.MNIST = fashion_mnist
def counted(cls):                                        # say the peer's parameter counts (G first, then D)
    def make(params, *args, **kwargs):
        params = list(params)
        print(f"peer_parameters {sum(p.numel() for p in params)}", flush=True)
        return cls(params, *args, **kwargs)
    return make
torch.optim.RMSprop, torch.optim.Adam = counted(torch.optim.RMSprop), counted(torch.optim.Adam)
stamps = []
def timed_print(*args, **kwargs):                        # the peer prints once per generator iteration
    if args and str(args[0]).startswith("[Epoch"):
        stamps.append(time.perf_counter())
        if len(stamps) > warmup + steps:
            dt = statistics.median(b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:]))
            print(f"peer_images_per_s {64 / dt:.2f}", flush=True)
            os._exit(0)
runpy.run_path(script, init_globals={"print": timed_print}, run_name="__main__")
"""


def fashion_mnist_raw(tmp: Path, data_root: str) -> Path:
    """Fashion-MNIST's four files, found where the scripts find them (--data-root, then Debian's
    /usr/share/datasets/fashion-mnist), unpacked where torchvision's FashionMNIST(root) looks for them."""
    raw = tmp / "torchvision" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in (*common._IDX_STEMS["train"], *common._IDX_STEMS["test"]):
        path = common._find_idx("fashion-mnist", Path(data_root).expanduser(), stem)
        if path is None:
            raise SystemExit(f"no {stem}(.gz) in --data-root {data_root} nor in {common.FASHION_MNIST_DEBIAN}")
        with (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")) as src, open(raw / stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return tmp / "torchvision"


def ours(script: str, flags: str, a, out: Path) -> float:
    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--dataset", "fashion-mnist", "--image-size", "28",
           "--batch-size", "64", "--n-critic", "5", "--steps", str(a.steps), "--log-every", str(a.log_every),
           "--sample-every", "1000000000", "--ckpt-every", "1000000000", "--device", a.device, "--out", str(out),
           "--data-root", a.data_root, *(["--no-critic-burst"] if script == "wgan" else []), *flags.split()]
    proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
    if script not in a.said:
        print(f"{script}.py: {proc.stdout.splitlines()[0]}", flush=True)   # the parameter counts
        a.said.add(script)
    with open(out / "metrics.csv", newline="") as f:
        rates = [float(r["images_per_s"]) for r in csv.DictReader(f) if r.get("images_per_s")]
    warmup = 2 if "--compile" in flags else 1
    return statistics.median(rates[warmup:-1] or rates[warmup:])   # the last interval may be shorter


def peer(script: str, a, root: Path, work: Path) -> float:
    work.mkdir(parents=True)    # the peer writes images/ and ../../data/mnist relative to its folder
    path = Path(a.peer).resolve() / script / f"{script}.py"
    proc = subprocess.run([sys.executable, "-c", PEER, str(path), str(a.steps), str(a.warmup), str(root)],
                          capture_output=True, text=True, cwd=work)
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("peer_")]
    if not lines or lines[-1][0] != "peer_images_per_s":
        raise SystemExit(f"the peer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if f"peer {script}" not in a.said:
        counts = [int(n) for k, n in lines if k == "peer_parameters"]
        print(f"peer {script}: G {counts[0]:,} parameters, D {counts[1]:,} parameters (MLPs)", flush=True)
        a.said.add(f"peer {script}")
    return float(lines[-1][1])


def side_by_side(a) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = fashion_mnist_raw(Path(tmp), a.data_root) if a.peer else None
        for r in range(a.rounds):
            for script in a.scripts:
                for config in a.configs:
                    flags = " ".join(f"--{f}" for f in config.split("+") if f != "none")
                    name = f"{script}.py {flags or '(no flag)'}"
                    out = Path(tmp) / f"ours{r}-{script}-{config}"
                    results.setdefault(name, []).append(ours(script, flags, a, out))
                    print(f"round {r + 1}: {name}: {results[name][-1]:.1f} images/s", flush=True)
                if a.peer:
                    name = f"peer {script}"
                    work = Path(tmp) / f"peer{r}-{script}" / "a" / "b"
                    results.setdefault(name, []).append(peer(script, a, root, work))
                    print(f"round {r + 1}: {name}: {results[name][-1]:.1f} images/s", flush=True)
    print(f"\n28x28x1 Fashion-MNIST, batch 64, n_critic 5, {a.device}: generator iterations x 64 per second, best of "
          f"{a.rounds} round(s)")
    for name, rates in results.items():
        script = name.split()[0].removesuffix(".py") if not name.startswith("peer") else name.split()[1]
        peer_rate = max(results[f"peer {script}"]) if a.peer else None
        ratio = f"  {max(rates) / peer_rate:.2f}x the peer" if peer_rate and not name.startswith("peer") else ""
        print(f"  {name:<45s} {max(rates):8.1f} images/s{ratio}")


def critic_iteration(G, critic, opt_critic, x, cfg, calls: int) -> None:
    """wgan_gp.train_step's critic iteration, with D(x), D(x~), D(x^) from ``calls`` calls of the critic."""
    import torch
    import wgan_gp
    with torch.no_grad():
        fake = G(wgan_gp.sample_z(len(x), cfg.nz, x.device))
    x_hat = wgan_gp.interpolate(x, fake).requires_grad_(True)
    if calls == 1:
        d_real, d_fake, d_hat = critic(torch.cat([x, fake, x_hat])).split(len(x))
    elif calls == 2:
        (d_real, d_fake), d_hat = critic(torch.cat([x, fake])).split(len(x)), critic(x_hat)
    else:
        d_real, d_fake, d_hat = critic(x), critic(fake), critic(x_hat)
    loss = d_fake.mean() - d_real.mean() + cfg.lambda_gp * wgan_gp.gradient_penalty(d_hat, x_hat).mean()
    opt_critic.zero_grad(set_to_none=True)
    loss.backward()
    opt_critic.step()


def critic_calls(a) -> None:
    import torch
    import wgan_gp
    cfg = wgan_gp.resolve(wgan_gp.Config(image_size=28, n_critic=5, batch_size=64))
    device = torch.device(a.device)
    torch.manual_seed(0)
    G, critic = wgan_gp.build(cfg, device)
    count = common.count_parameters
    print(f"wgan_gp --arch dcgan, 28 x 28: G {count(G):,}, critic {count(critic):,} parameters", flush=True)
    opt_critic = torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = common.Batches(common.load_images("fashion-mnist", a.data_root, 28), 64, 0, device)
    rates = {1: [], 2: [], 3: []}
    for r in range(a.rounds):
        for calls in rates:
            critic_iteration(G, critic, opt_critic, batches.next(), cfg, calls)   # warm-up
            times = []
            for _ in range(a.steps):
                t = time.perf_counter()
                critic_iteration(G, critic, opt_critic, batches.next(), cfg, calls)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            rates[calls].append(64 / statistics.median(times))
            print(f"round {r + 1}: critic_calls={calls}: {rates[calls][-1]:.1f} images/s", flush=True)
    print(f"\nwgan_gp's critic iteration, 28 x 28, batch 64, {a.device}: median of {a.steps} iterations, best of "
          f"{a.rounds} round(s)")
    names = {1: "1 call, cat(x, x~, x^)", 2: "2 calls, cat(x, x~) + x^ (default)", 3: "3 calls"}
    for calls, r in rates.items():
        print(f"  {names[calls]:<40s} {max(r):8.1f} images/s  {max(r) / max(rates[3]):.2f}x three calls")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", help="PyTorch-GAN's implementations/ folder (holding wgan/wgan.py, wgan_gp/wgan_gp.py); "
                   "without it: ours alone")
    p.add_argument("--data-root", default="data", help="where Fashion-MNIST's files are, as the scripts' --data-root "
                   "(default: %(default)s, then Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--critic-calls", action="store_true", help="time wgan_gp's critic iteration with 1, 2, 3 calls")
    p.add_argument("--scripts", nargs="*", default=["wgan", "wgan_gp"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, help="iterations timed in each run (default: 40 generator iterations; "
                   "--critic-calls: 50 critic ones)")
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3, help="generator iterations of the peer left out of its median")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="*", default=["none"], help="our flag sets, flags without dashes joined by + "
                   "(default: %(default)s)")
    a = p.parse_args()
    a.said = set()
    if a.critic_calls:
        a.steps = a.steps or 50
        critic_calls(a)
    else:
        a.steps = a.steps or 40
        side_by_side(a)


if __name__ == "__main__":
    main()
