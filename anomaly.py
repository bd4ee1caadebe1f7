"""Anomaly detection with the generative models: one-class scores, synthetic local defects, generated negatives.

The application is visual inspection: many images of good parts, few or none of defective ones. Two protocols
(image AUROC, the Mann-Whitney statistic with ties counted 1/2, higher score = more anomalous):
- one class vs the rest (Ruff et al. 2018, arXiv:1802.06822; Golan & El-Yaniv 2018): a model is trained on class c
  alone (<script>.py --only-class c), then scores the whole test split; normal = class c, anomalies = the others.
- synthetic local defects, the offline stand-in for MVTec AD: class c's own test images, each also with a seeded
  defect: cutpaste (a patch of the image moved within it; Li et al. 2021, arXiv:2104.04015), scar (a thin rotated
  stripe of it, the same paper) and rect (a rectangle of another image blended in at a random opacity; DRAEM,
  Zavrtanik et al. 2021, arXiv:2108.07610, whose rectangles score within a point of its Perlin masks).
Scores come from each model file's --score command (the mathematics stays with its paper: vae -ELBO and IWAE, realnvp
bits/dim and bits/dim minus the PNG code length, ddpm partial-diffusion reconstruction and eps error, dcgan and
wgan_gp the discriminator / critic), beside two floors computed here: the raw-pixel distance to the nearest training
image of class c, and the PCA-16 reconstruction error. A third route uses generated data as training negatives: a
classifier of fid.py's recipe trained on class c against synthetic defects (of two types, tested on the third too),
against a generator's samples (--negatives NPZ, e.g. an early checkpoint's), or against a fraction gamma of real
labelled anomalies of one class (Deep SAD's reference, Ruff et al. 2020, gamma = 0.05).
Nothing is chosen on the test split: fixed steps and seeds, and besides the AUROC, the detection rate at the
threshold a production line would set on held-out normal images only (the 95th percentile of class c's validation
hold-out, which no --only-class run trains on).

Usage (the CPU-sized table, its commands and the SLURM array lines: docs/anomaly.md):
    python anomaly.py --script vae --classes 0 6 7 --steps 1500 --out results/vae
    python anomaly.py --script ddpm --classes 0 --steps 2000 --test-n 2000 --out results/ddpm -- --arch small
    python anomaly.py --floors --classes 0 1 2 3 4 5 6 7 8 9 --out results/floors
    python anomaly.py --negatives defects --classes 0 --out results/negatives
    python anomaly.py --script vae --dataset mvtec --data-root mvtec/bottle --steps 5000 --out results/bottle
"""
from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import common
import fid

DEFECTS = ("cutpaste", "scar", "rect")
SCRIPTS = ("vae", "realnvp", "ddpm", "dcgan", "wgan_gp")
ROOT = Path(__file__).resolve().parent


def auroc(normal, anomalous) -> float:
    """P(score of an anomaly > score of a normal image) + 1/2 P(equal): the Mann-Whitney U over the product of the
    two sets' sizes, from average ranks (ties share theirs)."""
    normal, anomalous = np.asarray(normal, float), np.asarray(anomalous, float)
    scores = np.concatenate([normal, anomalous])
    values, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]          # average rank of each value, from 1
    u = ranks[len(normal):].sum() - len(anomalous) * (len(anomalous) + 1) / 2
    return float(u / (len(normal) * len(anomalous)))


def detection_rate(held_out_normal, anomalous, percentile: float = 95.0) -> float:
    """The fraction of anomalies above the threshold set on held-out normal images alone (their percentile)."""
    return float((np.asarray(anomalous) > np.percentile(np.asarray(held_out_normal), percentile)).mean())


# ---- synthetic local defects, each seeded per image --------------------------------------------------------------
def _box(size: int, area: tuple, g: torch.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random rectangle of ``area`` (fractions of the image), aspect in [0.3, 3.3]."""
    a = size * size * (area[0] + (area[1] - area[0]) * torch.rand((), generator=g).item())
    aspect = math.exp(math.log(0.3) + (math.log(3.3) - math.log(0.3)) * torch.rand((), generator=g).item())
    h = max(1, min(size, round(math.sqrt(a * aspect))))
    w = max(1, min(size, round(math.sqrt(a / aspect))))
    return int(torch.randint(size - h + 1, (), generator=g)), int(torch.randint(size - w + 1, (), generator=g)), h, w


def defect(image: torch.Tensor, kind: str, g: torch.Generator, other: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(the image with one defect, the defect's mask), uint8 C x S x S in and out. cutpaste: a patch of 2-15% of the
    image moved elsewhere in it; scar: a stripe 1/14 of the side wide and 1/4 to 1/2 of it long, rotated, filled
    with the image shifted; rect: a rectangle of 5-25% of the image blended from ``other`` at an opacity of 0.1-1."""
    c, size, _ = image.shape
    out, mask = image.clone(), torch.zeros(size, size, dtype=torch.bool)
    if kind == "cutpaste":
        top, left, h, w = _box(size, (0.02, 0.15), g)
        to_top, to_left = (int(torch.randint(size - k + 1, (), generator=g)) for k in (h, w))
        out[:, to_top:to_top + h, to_left:to_left + w] = image[:, top:top + h, left:left + w]
        mask[to_top:to_top + h, to_left:to_left + w] = True
    elif kind == "scar":
        width, length = max(1, size // 14), size * (0.25 + 0.25 * torch.rand((), generator=g).item())
        cy, cx, angle = (torch.rand(3, generator=g) * torch.tensor([size, size, math.pi])).tolist()
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        along = (yy - cy) * math.sin(angle) + (xx - cx) * math.cos(angle)
        across = (yy - cy) * math.cos(angle) - (xx - cx) * math.sin(angle)
        mask = (along.abs() <= length / 2) & (across.abs() <= width / 2)
        shift = tuple(int(v) for v in torch.randint(size // 4, size // 2 + 1, (2,), generator=g))
        out = torch.where(mask, image.roll(shift, dims=(1, 2)), image)
    else:
        top, left, h, w = _box(size, (0.05, 0.25), g)
        beta = 0.1 + 0.9 * torch.rand((), generator=g).item()
        mask[top:top + h, left:left + w] = True
        out = torch.where(mask, ((1 - beta) * image.float() + beta * other.float()).round().to(torch.uint8), image)
    return out, mask


def defects(images: torch.Tensor, kind: str, seed: int, others: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image with a defect of ``kind``; image i's from a generator seeded by (seed, i), rect's blended image
    drawn from ``others`` with it: the same seed gives the same defects whatever the other images."""
    out, masks = [], []
    for i, image in enumerate(images):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        other = others[int(torch.randint(len(others), (), generator=g))]
        x, m = defect(image, kind, g, other)
        out.append(x)
        masks.append(m)
    return torch.stack(out), torch.stack(masks)


# ---- the floors: no generative model ------------------------------------------------------------------------------
def nearest_neighbour(train: torch.Tensor, images: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """The raw-pixel (L2, pixels in [0, 1]) distance of each image to its nearest training image."""
    a = train.flatten(1).float() / 255
    return torch.cat([torch.cdist(b.flatten(1).float() / 255, a).min(1).values for b in images.split(chunk)])


def pca_error(train: torch.Tensor, images: torch.Tensor, k: int = 16) -> torch.Tensor:
    """The squared reconstruction error of each image from the training images' top-k principal components."""
    a = train.flatten(1).float() / 255
    mean = a.mean(0)
    components = torch.linalg.svd(a - mean, full_matrices=False).Vh[:k]
    x = images.flatten(1).float() / 255 - mean
    return (x - x @ components.T @ components).pow(2).sum(1)


# ---- one run: train on class c, score, measure ---------------------------------------------------------------------
def script_scores(a, c: int | None, seed: int, images: Path, sizes: dict[str, int]) -> dict[str, dict]:
    """<script>.py trained on class c (--only-class c; MVTec: train/good) for --steps at --seed, resumed if it was
    stopped, then its --score of every image set at once (``images``: the sets one after the other, ``sizes`` their
    lengths): {set: {score name: scores}}."""
    out = Path(a.out) / "runs" / (f"c{c}-s{seed}" if c is not None else f"s{seed}")
    only = ["--only-class", str(c)] if c is not None else []
    run([sys.executable, str(ROOT / f"{a.script}.py"), "--dataset", a.dataset, "--data-root", a.data_root, *only,
         "--seed", str(seed), "--steps", str(a.steps), "--out", str(out), "--resume", "--device", a.device,
         "--log-every", str(max(1, a.steps // 10)), "--sample-every", str(a.steps), *a.extra])
    step = common.load_checkpoint(out / "ckpt.pt", a.script)["step"]
    if step < a.steps:   # a signal (a preemption) stopped it: never score a model trained less than --steps
        raise common.UserError(f"{a.script}.py was stopped at step {step} of {a.steps}: the same command continues it")
    run([sys.executable, str(ROOT / f"{a.script}.py"), "--out", str(out), "--score", str(images), "--score-out",
         str(out / "scores.csv"), "--seed", str(seed), "--device", a.device, *a.score_flags])
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = {k: np.array([float(r[k]) for r in rows]) for k in rows[0] if k not in ("index", "label")}
    ends = np.cumsum(list(sizes.values()))
    return {name: {k: v[end - n:end] for k, v in columns.items()} for (name, n), end in zip(sizes.items(), ends)}


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise common.UserError(f"{' '.join(cmd[1:3])} ... failed (exit {proc.returncode}): "
                               f"{(proc.stderr.strip().splitlines() or ['?'])[-1]}")


def negatives_scores(a, c: int | None, seed: int, normal: torch.Tensor, train: torch.Tensor, labels: torch.Tensor,
                     images: dict[str, torch.Tensor]) -> dict[str, dict]:
    """fid.py's classifier recipe with 2 outputs, trained for --steps on the normal training images against
    negatives, balanced batches; its score is the negative logit minus the normal one. {set: {score name: scores}}."""
    g = torch.Generator().manual_seed(seed)
    if a.negatives == "defects":    # two defect types, on training images; the third is one it never saw
        neg = torch.cat([defects(normal, k, seed + 1, normal)[0] for k in DEFECTS if k != a.held_out_defect])
    elif a.negatives == "real":     # Deep SAD's reference: gamma of real labelled anomalies, of one known class
        known = ((labels == (c + 1) % (int(labels.max()) + 1)) & ~common.validation_mask(labels)).nonzero().flatten()
        neg = train[known[torch.randperm(len(known), generator=g)[:round(a.gamma / (1 - a.gamma) * len(normal))]]]
    else:                           # generated images, e.g. an early checkpoint's samples of class c
        try:
            with np.load(a.negatives) as npz:
                neg = common.resize_uint8(torch.from_numpy(npz["images"]).permute(0, 3, 1, 2), normal.shape[-1])
        except (OSError, KeyError, ValueError) as e:
            raise common.UserError(f"--negatives {a.negatives}: defects, real, or an .npz of images ({e})") from None
    x, device = fid._prepared(torch.cat([normal, neg])), common.pick_device(a.device)

    def batch(step: int):           # 64 normal images and 64 negatives
        i = torch.cat([torch.randint(len(normal), (64,), generator=g),
                       len(normal) + torch.randint(len(neg), (64,), generator=g)])
        return x[i].to(device), (i >= len(normal)).long().to(device)
    net = fid.fit_classifier(batch, a.steps, 2, seed=seed, device=device, log=lambda *_: None)
    name = "negatives_" + (a.negatives if a.negatives in ("defects", "real") else "generated")
    with torch.inference_mode():
        logits = {k: torch.cat([net(fid._prepared(b).to(device))[1].cpu() for b in v.split(1000)])
                  for k, v in images.items()}
    return {k: {name: (v[:, 1] - v[:, 0]).numpy()} for k, v in logits.items()}


def measure(a) -> list[dict]:
    """Every class and seed: the scores of the test split, the held-out normals and the defect sets; the rows."""
    train, train_y = common.load_images(a.dataset, a.data_root, labels=True)
    test, test_y = common.load_images(a.dataset, a.data_root, split="test", labels=True)
    if a.test_n:
        test, test_y = test[:a.test_n], test_y[:a.test_n]
    held = common.validation_mask(train_y)
    mvtec_types = sorted(p.name for p in (Path(a.data_root) / "test").glob("*") if p.is_dir() and p.name != "good"
                         ) if a.dataset == "mvtec" else []   # labels 1, 2...: the defect types by name, as read
    sets = Path(a.out) / "sets"
    sets.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in [None] if a.dataset == "mvtec" else a.classes:   # MVTec: good is 0, the test's defect types 1, 2...
        normal = (test_y == (c or 0)).numpy()
        normal_train = train[(train_y == (c or 0)) & ~held]
        images = {"test": test, "validation": train[held & (train_y == (c or 0))]}
        for kind in DEFECTS if a.dataset != "mvtec" else ():
            images[kind], masks = defects(test[normal], kind, 0, train[train_y != c])
            np.savez(sets / f"c{c}-{kind}.npz", images=images[kind].permute(0, 2, 3, 1).numpy(), masks=masks.numpy())
            common.save_grid(images[kind][:64], sets / f"c{c}-{kind}.png", nrow=8, value_range=(0, 255))
        together = sets / f"c{c}.npz"    # every set, one after the other: one --score call per run
        np.savez(together, images=torch.cat(list(images.values())).permute(0, 2, 3, 1).numpy())
        for seed in a.seeds:
            scored = {}
            if a.floors:
                for name, fn in (("raw_1nn", nearest_neighbour), ("pca16", pca_error)):
                    for set_name, x in images.items():
                        scored.setdefault(set_name, {})[name] = fn(normal_train, x).numpy()
            if a.script:
                for set_name, s in script_scores(a, c, seed, together, {k: len(v) for k, v in images.items()}).items():
                    scored.setdefault(set_name, {}).update(s)
            if a.negatives:
                for set_name, s in negatives_scores(a, c, seed, normal_train, train, train_y, images).items():
                    scored.setdefault(set_name, {}).update(s)
            for score, s_test in scored["test"].items():
                s_val, found = scored["validation"][score], {"one-class": s_test[~normal]}
                found.update({kind: scored[kind][score] for kind in DEFECTS if kind in scored})
                found.update({kind: s_test[(test_y == k).numpy()] for k, kind in enumerate(mvtec_types, 1)})
                for protocol, anomalous in found.items():
                    value, rate = auroc(s_test[normal], anomalous), detection_rate(s_val, anomalous)
                    rows.append({"class": "" if c is None else c, "seed": seed, "score": score, "protocol": protocol,
                                 "auroc": round(value, 4), "detection_rate_at_95": round(rate, 4)})
                    print(f"class {c} seed {seed} {score:>14s} {protocol:>9s}: AUROC {value:.4f}, detection rate "
                          f"{rate:.3f} at the held-out normals' 95th percentile", flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    """A Markdown table: for each score and protocol, the AUROC of each class (mean over seeds) and the mean."""
    classes = sorted({r["class"] for r in rows}, key=str)
    lines = ["| score | protocol | " + " | ".join(f"class {c}" for c in classes) + " | mean |",
             "|---" * (len(classes) + 3) + "|"]
    for score in dict.fromkeys(r["score"] for r in rows):
        for protocol in dict.fromkeys(r["protocol"] for r in rows):
            per = [[r["auroc"] for r in rows if (r["score"], r["protocol"], r["class"]) == (score, protocol, c)]
                   for c in classes]
            if all(per):
                means = [100 * statistics.mean(v) for v in per]
                lines.append(f"| {score} | {protocol} | " + " | ".join(f"{m:.1f}" for m in means)
                             + f" | **{statistics.mean(means):.1f}** |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = common.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                      allow_abbrev=False)
    p.add_argument("--script", choices=SCRIPTS, help="the generative model whose --score is measured")
    p.add_argument("--floors", action="store_true", help="also the raw-pixel 1-NN and PCA-16 floors")
    p.add_argument("--negatives", metavar="KIND", help="a classifier against negatives: defects (two types; the third, "
                   "--held-out-defect, unseen) | real (gamma of labelled anomalies) | an .npz of generated images")
    p.add_argument("--held-out-defect", default="rect", choices=DEFECTS)
    p.add_argument("--gamma", type=float, default=0.05, help="--negatives real: the fraction of labelled anomalies")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist | mnist | cifar10 | synthetic | mvtec")
    p.add_argument("--data-root", default="data")
    p.add_argument("--classes", type=int, nargs="+", help="the normal classes, one at a time (default: all)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=1500, help="training steps of each model and classifier")
    p.add_argument("--test-n", type=int, default=0, help="the first N test images only (0: all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--score-flags", default="", type=shlex.split, help="more flags of the --score command, quoted "
                   "(e.g. '--k 100')")
    p.add_argument("--out", default="anomaly", help="folder of results.csv, table.md and the runs")
    p.add_argument("extra", nargs="*", help="after --: more flags of the model script's training")
    a = p.parse_args(argv)
    if not (a.script or a.floors or a.negatives):
        p.error("give --script, --floors or --negatives (or several)")
    common.check_dataset(a.dataset, (*common.CLASSES, "mvtec"))
    a.classes = a.classes or list(range(common.CLASSES.get(a.dataset, 1)))
    if a.dataset != "mvtec" and not set(a.classes) <= set(range(common.CLASSES[a.dataset])):
        p.error(f"--classes: {a.dataset} has classes 0 to {common.CLASSES[a.dataset] - 1}")
    if a.negatives not in (None, "defects", "real") and not Path(a.negatives).is_file():
        p.error(f"--negatives {a.negatives}: give defects, real, or an .npz of generated images")
    if a.negatives == "real" and a.dataset == "mvtec":
        p.error("--negatives real takes another class's images: MVTec AD has one class; use defects or an .npz")
    common.make_writable(Path(a.out), "--out")
    rows = measure(a)
    with open(Path(a.out) / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = table(rows)
    (Path(a.out) / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    common.run_main(main)
