"""Test bits/dim of a realnvp.py checkpoint, as saved and with every batch norm's running averages replaced by
the mean statistics of N training minibatches: how much the running averages' noise (momentum 0.1, the official
code's) moves the test bits/dim. A diagnostic, not the paper's evaluation; the weights are not touched.

    python tools/realnvp_bn_average.py runs/realnvp-fm-cpu/ckpt.pt --test 2000 --batches 100
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
import realnvp  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt")
    parser.add_argument("--test", type=int, default=2000, help="first N test images")
    parser.add_argument("--batches", type=int, default=100, help="training minibatches averaged")
    parser.add_argument("--data-root", default="data")
    args = parser.parse_args()
    cfg, _ = common.load_config(realnvp.Config, args.ckpt, "realnvp")
    model = realnvp.load(args.ckpt)
    size = realnvp.image_size(cfg)
    test = common.load_images(cfg.dataset, args.data_root, size, split="test")[:args.test]
    train = common.load_images(cfg.dataset, args.data_root, size)
    print(f"as saved: {realnvp.evaluate_bpd(model, test):.4f} bits/dim on {len(test)} test images")

    flow_norms = [m for m in model.modules() if isinstance(m, realnvp.BatchNorm)]
    sums = {m: [0.0, 0.0] for m in flow_norms}

    def record(module, inputs, output):   # the flow's batch norms: the minibatch's mean and biased variance
        x = inputs[0]
        sums[module][0] += x.mean(dim=(0, 2, 3))
        sums[module][1] += x.var(dim=(0, 2, 3), unbiased=False)
    hooks = [m.register_forward_hook(record) for m in flow_norms]
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):   # inside s and t: PyTorch's cumulative average
            m.reset_running_stats()
            m.momentum = None
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    with torch.no_grad():
        for _ in range(args.batches):
            x = train[torch.randint(0, len(train), (cfg.batch_size,), generator=g)].float()
            model(realnvp.dequantize(x, g))
    for h in hooks:
        h.remove()
    for m in flow_norms:
        m.running_mean.copy_(sums[m][0] / args.batches)
        m.running_var.copy_(sums[m][1] / args.batches)
    print(f"running averages over {args.batches} training minibatches: "
          f"{realnvp.evaluate_bpd(model.eval(), test):.4f} bits/dim on {len(test)} test images")


if __name__ == "__main__":
    main()
