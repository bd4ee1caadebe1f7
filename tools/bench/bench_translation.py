"""pix2pix.py's and cyclegan.py's training step beside the official implementation's, step by step in one process.

    python tools/bench/bench_translation.py --peer /tmp/peers/pytorch-CycleGAN-and-pix2pix     # CPU, 128 x 128, batch 1
    python tools/bench/bench_translation.py --peer ~/pytorch-CycleGAN-and-pix2pix --device cuda --image-size 256 \
        --configs none amp+channels-last
    python tools/bench/bench_translation.py --device cuda --image-size 256    # ours alone (no checkout of the peer)

The official implementation is junyanz/pytorch-CycleGAN-and-pix2pix (a checkout of it: --peer, imported from
there, never copied). Both sides train the paper's networks at the same size and batch: pix2pix's U-Net with
log2(size) levels (the official unet_128 at 128, unet_256 at 256) and 70 x 70 PatchGAN, batch norm, dropout,
BCE loss; CycleGAN's resnet_9blocks pair and PatchGAN pair, instance norm, LSGAN, pools of 50; RGB; the
parameter counts of both sides are printed.

The peer is its own model class, built by its own option parser and models.create_model (networks, losses,
optimizers, pools, initialisation), and each of its steps is its set_input with random images of the size
(its DataLoader and per-image PIL work left out, to its advantage) and its optimize_parameters, unchanged.
Ours is each step of the script's training loop: the next batch(es) from common.Batches (random uint8 images
held on the device at the load size, 286/256 of the size, randomly cropped and flipped), the learning rate
of the step, and the script's train_step, with the flags of each --configs entry (amp: bf16 autocast,
channels-last: NHWC).

Both run in one process and take turns, one step each, their order rotating from step to step, so that the
load of a shared machine hits them alike; each side's figure is the batch over the median time of its steps
after --warmup steps (time.perf_counter, with a CUDA synchronisation on a GPU).
"""
import argparse
import contextlib
import io
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402
import cyclegan  # noqa: E402
import pix2pix  # noqa: E402


def peer_model(peer: str, script: str, a, device: torch.device):
    """The official model of ``script``, built as its train.py builds it (flags: the size, batch, device)."""
    sys.path.insert(0, str(Path(peer).resolve()))
    from models import create_model
    from options.train_options import TrainOptions
    model = {"pix2pix": "pix2pix", "cyclegan": "cycle_gan"}[script]
    net_G = f"unet_{a.image_size}" if script == "pix2pix" else "resnet_9blocks"
    argv = ["--dataroot", "unused", "--name", "bench", "--model", model, "--netG", net_G, "--checkpoints_dir",
            a.checkpoints, "--gpu_ids", str(device.index or 0) if device.type == "cuda" else "-1", "--batch_size",
            str(a.batch_size), "--load_size", str(a.image_size), "--crop_size", str(a.image_size), "--display_id", "-1"]
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        with contextlib.redirect_stdout(io.StringIO()):   # its option table and network printout
            opt = TrainOptions().parse()
            m = create_model(opt)
            m.setup(opt)
    finally:
        sys.argv = saved
    counts = {name: common.count_parameters(getattr(m, "net" + name)) for name in m.model_names}
    shape = (a.batch_size, 3, a.image_size, a.image_size)

    def step():
        m.set_input({"A": torch.rand(shape) * 2 - 1, "B": torch.rand(shape) * 2 - 1,
                     "A_paths": [""] * a.batch_size, "B_paths": [""] * a.batch_size})
        m.optimize_parameters()
    return step, counts


def our_step(script: str, flags: set, a, device: torch.device):
    """One step of ``script``'s training loop, as its main() runs it, with ``flags`` (amp, channels-last)."""
    load = a.image_size * 286 // 256
    memory_format = torch.channels_last if "channels-last" in flags else torch.contiguous_format
    amp = torch.bfloat16 if "amp" in flags else None
    images = lambda c: torch.randint(0, 256, (16, c, load, load), dtype=torch.uint8)   # noqa: E731
    batches = lambda x, seed: common.Batches(x, a.batch_size, seed, device, memory_format=memory_format,   # noqa: E731
                                             crop=a.image_size, hflip=True)
    step = [0]
    if script == "pix2pix":
        cfg = pix2pix.Config(dataset="aligned", image_size=a.image_size, load_size=load, batch_size=a.batch_size)
        G, D = (net.to(memory_format=memory_format) for net in pix2pix.build(cfg, device))
        opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        data = batches(images(6), 0)

        def run():
            pair = data.next()
            pix2pix.train_step(G, D, opt_G, opt_D, pair[:, :3], pair[:, 3:], pix2pix.lr_at(step[0], 16, cfg), cfg, amp)
            step[0] += 1
        return run, {"G": common.count_parameters(G), "D": common.count_parameters(D)}
    cfg = cyclegan.Config(dataset="unaligned", image_size=a.image_size, load_size=load, batch_size=a.batch_size)
    G, F, D_X, D_Y = (net.to(memory_format=memory_format) for net in cyclegan.build(cfg, device))
    opt_G = torch.optim.Adam([*G.parameters(), *F.parameters()], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam([*D_X.parameters(), *D_Y.parameters()], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    pools = [cyclegan.ImagePool(cfg.pool_size, seed, device) for seed in (0, 1)]
    data_A, data_B = batches(images(3), 0), batches(images(3), 1)

    def run():
        cyclegan.train_step(G, F, D_X, D_Y, opt_G, opt_D, *pools, data_A.next(), data_B.next(),
                            cyclegan.lr_at(step[0], 16, cfg), cfg, amp)
        step[0] += 1
    return run, {"G": common.count_parameters(G), "F": common.count_parameters(F), "D_X": common.count_parameters(D_X),
                 "D_Y": common.count_parameters(D_Y)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix (without it: ours alone)")
    p.add_argument("--scripts", nargs="*", default=["pix2pix", "cyclegan"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=128, help="128 or 256 (the official U-Nets' sizes)")
    p.add_argument("--batch-size", type=int, default=1, help="the papers'")
    p.add_argument("--steps", type=int, default=20, help="steps of each side")
    p.add_argument("--warmup", type=int, default=3, help="first steps of each side left out of its median")
    p.add_argument("--configs", nargs="*", default=["none"],
                   help="our flag sets, flags without dashes joined by + (default: %(default)s)")
    p.add_argument("--checkpoints", default="/tmp/bench-translation", help="the peer's --checkpoints_dir")
    a = p.parse_args()
    device = common.pick_device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for script in a.scripts:
        torch.manual_seed(0)
        sides = {"peer": peer_model(a.peer, script, a, device)} if a.peer else {}
        for config in a.configs:
            sides[config] = our_step(script, set(config.split("+")) - {"none"}, a, device)
        for name, (_, counts) in sides.items():
            print(f"{script} {name}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + " parameters", flush=True)
        times = {name: [] for name in sides}
        names = list(sides)
        for i in range(a.steps):
            for name in names[i % len(names):] + names[:i % len(names)]:   # the order rotates every step
                sync()
                t0 = time.perf_counter()
                sides[name][0]()
                sync()
                times[name].append(time.perf_counter() - t0)
        peer = a.batch_size / statistics.median(times["peer"][a.warmup:]) if a.peer else None
        print(f"\n{script}, {a.image_size}x{a.image_size}, batch {a.batch_size}, {device}, "
              f"median of {a.steps - a.warmup} steps each, taking turns:")
        for name in names:
            rate = a.batch_size / statistics.median(times[name][a.warmup:])
            label = "official optimize_parameters" if name == "peer" else f"ours ({name.replace('+', ' ')})"
            ratio = f"  {rate / peer:.2f}x the official" if peer else ""
            print(f"  {label:<36s} {rate:8.4f} images/s{ratio}", flush=True)


if __name__ == "__main__":
    main()
