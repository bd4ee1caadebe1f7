"""augment.py: the arms share one step budget, S = 0 is R exactly, real images passed as generated ones help and
shuffled labels hurt, and the subset regime refuses a generator that saw more real data."""
import csv

import numpy as np
import pytest
import torch

import augment
import common
import fid


def npz(path, images: torch.Tensor, labels: torch.Tensor, **extra) -> str:
    np.savez(path, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy(), **extra)
    return str(path)


def results(out) -> dict:
    with open(out / "results.csv", newline="") as f:
        return {r["arm"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Fashion-MNIST's training images as "generated" ones, with their labels and with shuffled labels."""
    tmp = tmp_path_factory.mktemp("fashion")
    x, y = common.load_images("fashion-mnist", "data", labels=True)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    return npz(tmp / "real.npz", x, y), npz(tmp / "shuffled.npz", x, shuffled)


def test_real_images_as_generated_help_at_n_10_and_shuffled_labels_hurt(fashion, tmp):
    """With the same 100 steps in every arm, N = 10 real images per class: adding 100 real images per class as
    if generated raises the test accuracy; the same images with shuffled labels lower it."""
    real, shuffled = fashion
    for name, path in (("real", real), ("shuffled", shuffled)):
        augment.main(["--per-class", "10", "--seeds", "0", "--steps", "100", "--arms", "R", "R+S", "--regime",
                      "oracle", "--synthetic", path, "--synthetic-per-class", "100", "--out", str(tmp / name)])
    helped, hurt = results(tmp / "real"), results(tmp / "shuffled")
    r = float(helped["R"]["test_accuracy"])
    assert r == float(hurt["R"]["test_accuracy"])
    assert float(helped["R+S"]["test_accuracy"]) > r + 0.03
    assert float(hurt["R+S"]["test_accuracy"]) < r - 0.03
    assert all(row["steps"] == "100" for row in [*helped.values(), *hurt.values()])
    assert "paired delta to R" in (tmp / "real" / "summary.txt").read_text()


def test_every_arm_takes_the_same_number_of_steps_and_no_synthetic_image_is_r_exactly(fashion, tmp, monkeypatch):
    """Extra images never mean extra training: each arm's classifier makes exactly --steps updates; with S = 0
    generated images, R+S draws R's batches and ends with R's weights, bit for bit."""
    calls = []
    fit = fid.fit_classifier

    def counted(batch, steps, *args, **kwargs):
        calls.append(steps)
        net = fit(batch, steps, *args, **kwargs)
        calls.append(net)
        return net
    monkeypatch.setattr(fid, "fit_classifier", counted)
    augment.main(["--per-class", "10", "--seeds", "0", "--steps", "20", "--regime", "oracle", "--synthetic", fashion[0],
                  "--synthetic-per-class", "0", "5", "--out", str(tmp / "s0")])
    steps, nets = calls[0::2], calls[1::2]
    assert steps == [20] * len(steps) and len(steps) == 1 + 1 + 2 + 1   # R, R+T, R+S with S = 0 and 5, S with 5
    r, r_s0 = nets[0].state_dict(), nets[2].state_dict()
    assert all(torch.equal(r[k], r_s0[k]) for k in r)


def test_the_subset_regime_refuses_a_generator_that_saw_more_real_data(tmp):
    x, y = common.load_images("synthetic", "data", labels=True)
    full = npz(tmp / "full.npz", x, y)
    other = npz(tmp / "other.npz", x, y, per_class=10, subset_seed=1)
    for path in (full, other):
        with pytest.raises(common.UserError,
                           match="--regime subset: .* not on the 10 images per class of subset seed 0"):
            augment.main(["--dataset", "synthetic", "--per-class", "10", "--seeds", "0", "--steps", "2", "--arms", "S",
                          "--regime", "subset", "--synthetic", path, "--out", str(tmp / "x")])
    mine = npz(tmp / "mine-0.npz", x, y, per_class=10, subset_seed=0)
    augment.main(["--dataset", "synthetic", "--per-class", "10", "--seeds", "0", "--steps", "2", "--arms", "S",
                  "--regime", "subset", "--synthetic", str(tmp / "mine-{seed}.npz"), "--out", str(tmp / "ok")])
    assert results(tmp / "ok")["S"]["synthetic"] == str(tmp / "mine-{seed}.npz") and mine


def test_the_classic_augmentation_crops_and_flips_within_the_padded_image():
    x = torch.zeros(2, 1, 28, 28)
    x[:, :, 10, 3] = 1.0
    out = augment.jitter(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and (out.sum((1, 2, 3)) <= 1).all()
    rows, cols = (out[0, 0] == 1).nonzero()[0]
    assert abs(rows - 10) <= 2 and (abs(cols - 3) <= 2 or abs(cols - 24) <= 2)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path
