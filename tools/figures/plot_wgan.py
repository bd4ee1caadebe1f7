"""The Wasserstein estimate against generator iterations, with the FID of --eval-every beside it (the WGAN
paper's Figure 3 point: the critic's estimate tracks sample quality), one panel per run folder.

    python tools/figures/plot_wgan.py runs/wgan-fashion-mnist runs/wgan_gp-fashion-mnist --out docs/wgan-w-estimate.png

Each point of the W_estimate curve is a metrics.csv row: the mean over the generator iterations since the
row before (--log-every); the paper median-filters its per-iteration curve instead.
"""
import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def column(rows, name):
    points = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in ("", None)]
    return list(zip(*points)) if points else ([], [])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders holding metrics.csv")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--titles", nargs="*", help="one title per run (default: the folder names)")
    a = p.parse_args()
    fig, axes = plt.subplots(1, len(a.runs), figsize=(4.6 * len(a.runs), 3.0), squeeze=False)
    for i, (ax, run) in enumerate(zip(axes[0], a.runs)):
        with open(Path(run) / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        ax.plot(*column(rows, "W_estimate"), color="tab:blue", lw=1)
        ax.set_xlabel("generator iterations", fontsize=8)
        ax.set_ylabel("W estimate (critic)", color="tab:blue", fontsize=8)
        ax.set_title(a.titles[i] if a.titles else Path(run).name, fontsize=9)
        ax.tick_params(labelsize=7)
        steps, fid = column(rows, "fid")
        if fid:
            twin = ax.twinx()
            twin.plot(steps, fid, "o-", color="tab:red", ms=3, lw=1)
            twin.set_ylabel("FID (classifier space)", color="tab:red", fontsize=8)
            twin.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
