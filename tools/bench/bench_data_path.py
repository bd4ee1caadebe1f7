"""How much of a dcgan training step the data path costs.

Times dcgan training steps fed by common.Batches (Fashion-MNIST held in memory, indexed by a seeded
permutation, converted to [-1, 1]) against the same steps fed by batches made beforehand, interleaving
the two so that machine load hits both alike, and times Batches.next() alone.

    python tools/bench/bench_data_path.py --image-size 28 --steps 20 --repeats 5
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import common  # noqa: E402
import dcgan  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = common.pick_device(a.device)
    cfg = dcgan.Config(dataset=a.dataset, image_size=a.image_size)
    G, D = dcgan.build(cfg, device)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    batches = common.Batches(common.load_images(a.dataset, "data", a.image_size), cfg.batch_size, 0, device)
    premade = [batches.next() for _ in range(a.steps)]

    def timed(feed):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(a.steps):
            dcgan.train_step(G, D, opt_G, opt_D, feed(i), cfg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return a.steps / (time.perf_counter() - t)

    timed(lambda i: premade[i])  # warm-up
    real, made = [], []
    for _ in range(a.repeats):
        real.append(timed(lambda i: batches.next()))
        made.append(timed(lambda i: premade[i]))
    t = time.perf_counter()
    for _ in range(1000):
        batches.next()
    data_ms = (time.perf_counter() - t)
    r, m = statistics.median(real), statistics.median(made)
    print(f"dcgan {a.image_size}x{a.image_size} batch {cfg.batch_size} on {device}: "
          f"{r:.2f} steps/s with Batches, {m:.2f} steps/s on pre-made tensors "
          f"(median of {a.repeats} x {a.steps} steps; difference {100 * (m - r) / m:+.1f}%)")
    print(f"Batches.next() alone: {data_ms:.3f} ms per batch = {100 * data_ms / 1000 * r:.2f}% of a step")


if __name__ == "__main__":
    main()
