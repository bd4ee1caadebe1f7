"""The README's row of samples: the top-left 2 x 4 samples of each model's grid in docs/, side by side.

    python tools/figures/readme_row.py        # writes docs/readme-row.png

The grids are the ones each docs page shows (28 x 28 Fashion-MNIST, 2-pixel padding, 8 a row), in this order:
dcgan, wgan_gp, vae, realnvp (T = 1), ddpm (ancestral).
"""
from pathlib import Path

from PIL import Image

DOCS = Path(__file__).resolve().parents[2] / "docs"
GRIDS = ["dcgan-fashion-mnist-28.png", "wgan_gp-fashion-mnist-28.png", "vae-fashion-mnist-samples.png",
         "realnvp-fashion-mnist-28-t1.0.png", "ddpm-fashion-mnist-28-ancestral.png"]
CELL, PAD, ROWS, COLS, GAP = 28, 2, 2, 4, 8


def main():
    w, h = COLS * (CELL + PAD) + PAD, ROWS * (CELL + PAD) + PAD
    row = Image.new("L", (len(GRIDS) * (w + GAP) - GAP, h), 255)
    for i, name in enumerate(GRIDS):
        row.paste(Image.open(DOCS / name).convert("L").crop((0, 0, w, h)), (i * (w + GAP), 0))
    row = row.resize((row.width * 2, row.height * 2), Image.NEAREST)
    row.save(DOCS / "readme-row.png")
    print(f"wrote {DOCS / 'readme-row.png'} ({row.width} x {row.height})")


if __name__ == "__main__":
    main()
