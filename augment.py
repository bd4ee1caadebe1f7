"""Does generated data help a classifier? The augmentation benchmark.

A small labelled set: N real images of each class (common.class_subset, the subset every --per-class run trains
on). One classifier recipe (fid.fit_classifier: fid.py's Classifier, AdamW, cosine schedule, batch 128), trained
for the same number of optimizer steps in every arm, so that extra images never mean extra training:
    R     the N real images of each class;
    R+T   the same with the classic augmentation: a random crop after 2 pixels of padding, a horizontal flip;
    R+S   the real images and S generated images of each class, each batch a fraction rho generated (default 1/2);
    S     the S generated images of each class alone: the Classification Accuracy Score (Ravuri & Vinyals 2019,
          arXiv:1905.10887) of the generator at that N.
Two regimes, labelled: subset (the generator was trained on the same N per class, with the same --subset-seed:
honest augmentation; a generator that saw more real data is refused) and oracle (the generator saw the whole
training split: "many normal parts, few labelled ones"). The subset seed is the classifier's seed.

Whatever is chosen (the generated set among several, e.g. ddpm's guidance w; rho; S) is chosen on the validation
hold-out (common.validation_mask: 1/12 of each class of the training split, in no subset), by the mean accuracy
over the seeds; the test split is read once per reported figure, for the chosen setting only. Reported: each
arm's test accuracy (mean, sd over the seeds), its worst class, and the paired difference to R (same seed).

Usage (the figures, the CPU-sized protocol and the SLURM array lines: docs/augment.md):
    python acgan.py --per-class 10 --subset-seed 0 --out runs/acgan-n10-s0 ...   # one generator per N and seed
    python acgan.py --out runs/acgan-n10-s0 --sample 10000 --sample-out gen/acgan-n10-s0.npz
    python augment.py --per-class 10 --seeds 0 1 2 --regime subset --synthetic 'gen/acgan-n10-s{seed}.npz'
    python augment.py --per-class 10 --seeds 0 1 2 --regime oracle --synthetic gen/ddpm-w0.npz gen/ddpm-w1.npz
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import numpy as np
import torch

import common
import fid

ARMS = ("R", "R+T", "R+S", "S")


def load_synthetic(path: str, seed: int, per_class: int, regime: str, classes: int) -> tuple[torch.Tensor, ...]:
    """The generated images and labels of ``path`` ({seed} replaced by the seed), checked for the regime: in the
    subset regime the .npz must record the same --per-class N and --subset-seed (written by --sample)."""
    path = path.replace("{seed}", str(seed))
    try:
        npz = np.load(path)
    except OSError as e:
        raise common.UserError(f"--synthetic {path}: cannot read it ({e}); write it with <script>.py --sample N "
                               f"--sample-out {path}") from None
    if "labels" not in npz.files:
        raise common.UserError(f"--synthetic {path} has no labels: sample a conditional model (acgan.py, ddpm.py "
                               f"--classes, vae.py --conditional)")
    trained_on = (int(npz["per_class"]), int(npz["subset_seed"])) if "per_class" in npz.files else None
    if regime == "subset" and trained_on != (per_class, seed):
        seen = f"{trained_on[0]} per class, subset seed {trained_on[1]}" if trained_on else "the whole training split"
        raise common.UserError(f"--regime subset: {path} comes from a generator trained on {seen}, not on the "
                               f"{per_class} images per class of subset seed {seed}: train it with --per-class "
                               f"{per_class} --subset-seed {seed}, or use --regime oracle")
    images = torch.from_numpy(npz["images"]).permute(0, 3, 1, 2)
    labels = torch.from_numpy(npz["labels"]).long()
    if labels.min() < 0 or labels.max() >= classes:
        raise common.UserError(f"--synthetic {path}: labels outside 0..{classes - 1}")
    return images, labels


def first_per_class(labels: torch.Tensor, per_class: int, classes: int) -> torch.Tensor:
    """The indices of the first ``per_class`` images of each class (a --sample .npz interleaves the classes)."""
    return torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in range(classes)]).sort().values


def jitter(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The classic augmentation of prepared images (N x 1 x 28 x 28): a random 28 x 28 crop of the image padded by
    2 pixels of background, and a horizontal flip with probability 1/2."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    top, left = torch.randint(0, 5, (n,), generator=g), torch.randint(0, 5, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = (top[:, None] + torch.arange(h)).to(x.device)
    cols = (left[:, None] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))).to(x.device)
    return padded[torch.arange(n, device=x.device)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]


def train_arm(real, synthetic, ratio: float, augment: bool, steps: int, classes: int, seed: int, device,
              batch_size: int = 128):
    """fid's classifier recipe for ``steps`` steps, each batch drawn with a generator seeded by ``seed``: all real
    (synthetic None), all synthetic (real None), or a fraction ``ratio`` synthetic. With no synthetic images the
    draws are exactly R's, so R+S with S = 0 is R bit for bit."""
    g = torch.Generator().manual_seed(seed)
    n_syn = batch_size if real is None else round(batch_size * ratio) if synthetic is not None else 0

    def batch(step: int):
        parts = []
        if n_syn < batch_size:
            i = torch.randint(len(real[0]), (batch_size - n_syn,), generator=g)
            parts.append((jitter(real[0][i], g) if augment else real[0][i], real[1][i]))
        if n_syn:
            i = torch.randint(len(synthetic[0]), (n_syn,), generator=g)
            parts.append((synthetic[0][i], synthetic[1][i]))
        return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)
    return fid.fit_classifier(batch, steps, classes, seed=seed, device=device, log=lambda *_: None)


def per_class_accuracy(net, images: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[float, float]:
    """(accuracy, the worst class's accuracy) of ``net`` on prepared images."""
    with torch.inference_mode():
        device = next(net.parameters()).device
        predicted = torch.cat([net(images[i:i + 1000].to(device))[1].argmax(1).cpu()
                               for i in range(0, len(images), 1000)])
    right = predicted == labels
    return right.float().mean().item(), min(right[labels == c].float().mean().item() for c in range(classes))


def run(a) -> list[dict]:
    """Every arm for every seed, the choices made on the validation hold-out; returns the rows of the CSV."""
    device = common.pick_device(a.device)
    images, labels = common.load_images(a.dataset, a.data_root, labels=True)
    test_images, test_labels = common.load_images(a.dataset, a.data_root, split="test", labels=True)
    classes = int(labels.max()) + 1
    held = common.validation_mask(labels)
    val = (fid._prepared(images[held]), labels[held])
    prepared = fid._prepared(images)
    rows, choices = [], {"R": [(None, 0, 0.0)], "R+T": [(None, 0, 0.0)],
                         "R+S": [(p, s, r) for p in a.synthetic for s in a.synthetic_per_class for r in a.ratios],
                         "S": [(p, s, 1.0) for p in a.synthetic for s in a.synthetic_per_class]}
    for arm in a.arms:
        trained = {}   # (choice, seed) -> (net, validation accuracy)
        for choice in choices[arm]:
            for seed in a.seeds:
                keep = common.class_subset(labels, a.per_class, seed)
                real = None if arm == "S" else (prepared[keep], labels[keep])
                synthetic = None
                if choice[0] is not None and choice[1] > 0:
                    x, y = load_synthetic(choice[0], seed, a.per_class, a.regime, classes)
                    chosen = first_per_class(y, choice[1], classes)
                    synthetic = (fid._prepared(x[chosen]), y[chosen])
                if real is None and synthetic is None:
                    continue
                net = train_arm(real, synthetic, choice[2], arm == "R+T", a.steps, classes, seed, device)
                trained[choice, seed] = (net, per_class_accuracy(net, *val, classes)[0])
                print(f"{arm} {choice} seed {seed}: validation accuracy {trained[choice, seed][1]:.4f}", flush=True)
        if not trained:
            continue

        def score(choice) -> float:   # the mean validation accuracy over the seeds
            accuracies = [trained[choice, seed][1] for seed in a.seeds if (choice, seed) in trained]
            return statistics.mean(accuracies) if accuracies else -1.0
        best = max(choices[arm], key=score)
        for seed in a.seeds:
            if (best, seed) not in trained:
                continue
            net, val_acc = trained[best, seed]
            acc, worst = per_class_accuracy(net, fid._prepared(test_images), test_labels, classes)   # test, once
            rows.append({"arm": arm, "regime": a.regime if arm in ("R+S", "S") else "", "per_class": a.per_class,
                         "seed": seed, "steps": a.steps, "synthetic": best[0] or "", "synthetic_per_class": best[1],
                         "ratio": best[2] if arm == "R+S" else "", "val_accuracy": round(val_acc, 5),
                         "test_accuracy": round(acc, 5), "worst_class": round(worst, 5)})
    return rows


def summary(rows: list[dict]) -> list[str]:
    """Mean and sd over the seeds of each arm, its worst class, and the paired difference to R."""
    base = {r["seed"]: r["test_accuracy"] for r in rows if r["arm"] == "R"}
    lines = [f"N = {rows[0]['per_class']} per class, {len(base) or len({r['seed'] for r in rows})} seed(s), "
             f"{rows[0]['steps']} steps in every arm"]
    for arm in ARMS:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        acc = [r["test_accuracy"] for r in mine]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0   # noqa: E731
        line = (f"  {arm:<4s} {100 * statistics.mean(acc):6.2f} +- {100 * sd(acc):5.2f}  worst class "
                f"{100 * statistics.mean(r['worst_class'] for r in mine):6.2f}")
        deltas = [r["test_accuracy"] - base[r["seed"]] for r in mine if r["seed"] in base]
        if arm != "R" and deltas:
            line += f"  paired delta to R {100 * statistics.mean(deltas):+6.2f} +- {100 * sd(deltas):5.2f}"
        if mine[0]["synthetic"]:
            line += f"  ({mine[0]['regime']}: {mine[0]['synthetic']}, S = {mine[0]['synthetic_per_class']}" + (
                f", rho = {mine[0]['ratio']})" if arm == "R+S" else ")")
        lines.append(line)
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in rows)]
    acc = [[100 * r["test_accuracy"] for r in rows if r["arm"] == arm] for arm in arms]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(arms, [statistics.mean(v) for v in acc], yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in acc],
           capsize=4, color="0.6")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"N = {rows[0]['per_class']} per class, {rows[0]['steps']} steps", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    p.add_argument("--dataset", default="fashion-mnist", choices=tuple(common.CLASSES))
    p.add_argument("--data-root", default="data")
    p.add_argument("--per-class", type=int, required=True, help="N real images of each class (10, 100, 1000)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="subset seeds = classifier seeds")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--synthetic", nargs="*", default=[], metavar="NPZ", help="generated images with labels (from "
                   "--sample); several: chosen on the validation split; {seed} is replaced by the seed")
    p.add_argument("--regime", choices=("subset", "oracle"), help="what the generator was trained on (needed with "
                   "--synthetic)")
    p.add_argument("--synthetic-per-class", type=int, nargs="+", default=[1000], metavar="S",
                   help="generated images of each class (several: chosen on the validation split)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5], metavar="RHO",
                   help="R+S: the generated fraction of each batch (several: chosen on the validation split)")
    p.add_argument("--steps", type=int, default=fid.CLASSIFIER_EPOCHS * math.ceil(60_000 / 128),
                   help="optimizer steps of every arm (default: the recipe's 6 epochs of the full Fashion-MNIST)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="augment", help="folder of results.csv, summary.txt, accuracy.png")
    a = p.parse_args(argv)
    if a.synthetic and not a.regime:
        p.error("--synthetic needs --regime subset or --regime oracle (what the generator was trained on)")
    if any(arm in ("R+S", "S") for arm in a.arms) and not a.synthetic:
        a.arms = [arm for arm in a.arms if arm not in ("R+S", "S")]
    if a.per_class < 1 or a.steps < 1 or any(not 0 < r < 1 for r in a.ratios) or min(a.synthetic_per_class) < 0:
        p.error("--per-class and --steps are at least 1, --ratios in (0, 1), --synthetic-per-class at least 0")
    out = Path(a.out)
    common.make_writable(out, "--out")
    rows = run(a)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = summary(rows)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    (out / "args.json").write_text(json.dumps(vars(a), indent=2) + "\n")
    plot(rows, out / "accuracy.png")
    print("\n".join(lines))
    print(f"wrote {out / 'results.csv'}, {out / 'summary.txt'}, {out / 'accuracy.png'}")


if __name__ == "__main__":
    common.run_main(main)
