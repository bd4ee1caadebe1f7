"""anomaly.py and the --score commands: AUROC's closed forms, the seeded defects, --only-class, a one-class model
that tells its class from the others, and scores that do not depend on the other images of the batch."""
import csv
import itertools

import numpy as np
import pytest
import torch

import anomaly
import common
from conftest import assert_clean_error, run_script

SMALL = {   # the tests' tiny settings of each script that has --score
    "vae": ["--image-size", 8, "--hidden", 16, "--nz", 2, "--k", 8],
    "realnvp": ["--image-size", 8, "--arch", "tiny"],
    "ddpm": ["--image-size", 8, "--arch", "tiny", "--T", 10, "--warmup", 0, "--sample-steps", 5, "--score-t0", 5],
    "dcgan": ["--image-size", 16, "--ngf", 4, "--ndf", 4],
    "wgan_gp": ["--image-size", 16, "--ngf", 4, "--ndf", 4],
}
COMMON = ["--dataset", "synthetic", "--batch-size", 16, "--device", "cpu"]


def test_auroc_closed_forms():
    assert anomaly.auroc([0, 1, 2], [3, 4]) == 1.0
    assert anomaly.auroc([3, 4], [0, 1, 2]) == 0.0
    assert anomaly.auroc([5, 5, 5], [5, 5]) == 0.5
    assert anomaly.auroc([0, 1], [1, 2]) == pytest.approx(3.5 / 4)     # 0<1, 0<2, 1=1 counts 1/2, 1<2
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 6, 40), rng.integers(2, 9, 30)              # many ties: the pairwise definition
    pairs = [(x < y) + 0.5 * (x == y) for x, y in itertools.product(a, b)]
    assert anomaly.auroc(a, b) == pytest.approx(np.mean(pairs), abs=1e-12)


def test_detection_rate_uses_the_held_out_normals_percentile():
    assert anomaly.detection_rate(np.arange(100), [94, 95, 200]) == pytest.approx(2 / 3)   # threshold 94.05
    assert anomaly.detection_rate(np.arange(100), [0, 1]) == 0.0


@pytest.mark.parametrize("kind, area", [("cutpaste", (0.02, 0.15)), ("scar", (0.01, 0.06)), ("rect", (0.05, 0.25))])
def test_defects_are_seeded_per_image_and_local(kind, area):
    images = common.synthetic_images(40, 1, 28, seed=3)
    others = 255 - images
    x, masks = anomaly.defects(images, kind, seed=5, others=others)
    again, _ = anomaly.defects(images, kind, seed=5, others=others)
    assert torch.equal(x, again)
    assert torch.equal(anomaly.defects(images[:10], kind, seed=5, others=others)[0], x[:10])   # per image
    assert not torch.equal(anomaly.defects(images, kind, seed=6, others=others)[0], x)
    assert torch.equal(torch.where(masks[:, None], images, x), images)                       # only inside the mask
    fraction = masks.float().mean((1, 2))
    slack = 2 / 28                                                                            # a row of rounding
    assert (fraction >= area[0] - slack).all() and (fraction <= area[1] + slack).all(), fraction
    assert (x != images).any((1, 2, 3)).float().mean() > 0.5   # most images visibly changed


def test_only_class_keeps_exactly_that_class_without_the_hold_out():
    cfg = common.parse_config(common.ImageConfig, ["--dataset", "synthetic", "--only-class", "1", "--only-class", "3"])
    assert cfg.only_class == (1, 3)
    images, labels = common.training_set(cfg)
    all_images, all_labels = common.load_images("synthetic", "data", labels=True)
    keep = ((all_labels == 1) | (all_labels == 3)) & ~common.validation_mask(all_labels)
    assert torch.equal(labels, all_labels[keep]) and torch.equal(images, all_images[keep])
    assert 0 < len(labels) < (all_labels == 1).sum() + (all_labels == 3).sum()
    with pytest.raises(common.UserError, match="classes 0 to 3"):
        common.training_set(common.parse_config(common.ImageConfig, ["--dataset", "synthetic", "--only-class", "4"]))


def read_scores(path) -> dict[str, np.ndarray]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def test_a_model_of_one_class_scores_the_other_classes_higher(tmp_path):
    """vae.py trained on the synthetic class 0 alone: its -ELBO ranks 1,024 fresh images of classes 1-3 above those
    of class 0, well above chance; the raw-pixel 1-NN floor on the same images says how separable they are."""
    x, y = common.synthetic_images(1024, 1, 28, seed=7, labels=True)
    np.savez(tmp_path / "fresh.npz", images=x.permute(0, 2, 3, 1).numpy(), labels=y.numpy())
    run_script("vae", *COMMON, *SMALL["vae"], "--only-class", 0, "--steps", 300, "--out", "run", cwd=tmp_path)
    run_script("vae", "--out", "run", "--score", "fresh.npz", "--score-out", "s.csv", cwd=tmp_path)
    s = read_scores(tmp_path / "s.csv")
    assert list(s) == ["index", "label", "neg_elbo", "iwae"] and np.array_equal(s["label"], y.numpy())
    normal = y.numpy() == 0
    train, labels = common.training_set(common.parse_config(common.ImageConfig, ["--dataset", "synthetic",
                                                                                "--only-class", "0"]))
    floor = anomaly.nearest_neighbour(train, x).numpy()
    floor_auroc = anomaly.auroc(floor[normal], floor[~normal])
    assert floor_auroc > 0.9
    for name in ("neg_elbo", "iwae"):
        assert anomaly.auroc(s[name][normal], s[name][~normal]) > 0.5 + (floor_auroc - 0.5) / 2, name


@pytest.mark.parametrize("script", list(SMALL))
def test_every_score_is_independent_of_the_other_images(tmp_path, script):
    """The same four images scored beside two different sets of companions, in one batch: the same scores (eval
    mode, noise seeded per image; a batch-norm in train mode or a shared noise draw would change them)."""
    x = common.synthetic_images(24, 1, 28, seed=9)
    for name, images in (("a", x[:8]), ("b", torch.cat([x[:4], x[12:24]]))):
        np.savez(tmp_path / f"{name}.npz", images=images.permute(0, 2, 3, 1).numpy())
    run_script(script, *COMMON, *SMALL[script], "--only-class", 0, "--steps", 2, "--out", "run", cwd=tmp_path)
    for name in "ab":
        run_script(script, "--out", "run", "--score", f"{name}.npz", cwd=tmp_path)
    a, b = (read_scores(tmp_path / "run" / f"scores-{name}.csv") for name in "ab")
    assert "label" not in a and len(a["index"]) == 8 and len(b["index"]) == 16
    for column in a:
        assert np.isfinite(a[column]).all(), column
        np.testing.assert_allclose(a[column][:4], b[column][:4], rtol=1e-5, atol=1e-6, err_msg=column)
    proc = run_script(script, "--out", "run", "--score", "missing.npz", cwd=tmp_path, check=False)
    assert_clean_error(proc, "missing.npz")


def test_anomaly_py_measures_floors_and_generated_negatives(tmp_path):
    anomaly.main(["--floors", "--negatives", "defects", "--dataset", "synthetic", "--classes", "0", "2",
                  "--steps", "30", "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    found = {(r["class"], r["score"], r["protocol"]) for r in rows}
    assert found == {(c, s, p) for c in "02" for s in ("raw_1nn", "pca16", "negatives_defects")
                     for p in ("one-class", *anomaly.DEFECTS)}
    assert all(0 <= float(r["auroc"]) <= 1 and 0 <= float(r["detection_rate_at_95"]) <= 1 for r in rows)
    assert min(float(r["auroc"]) for r in rows if r["score"] == "raw_1nn" and r["protocol"] == "one-class") > 0.75
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| raw_1nn | one-class |" in table and "class 2" in table
    assert (tmp_path / "out" / "sets" / "c0-scar.png").is_file()


def test_mvtec_folders_are_read_as_distributed(tmp_path):
    from PIL import Image
    root = tmp_path / "bottle"
    x = common.synthetic_images(30, 3, 32, seed=4)
    for folder, images in (("train/good", x[:18]), ("test/good", x[18:22]), ("test/crack", 255 - x[22:26]),
                           ("test/broken_large", 255 - x[26:30])):
        (root / folder).mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / folder / f"{i:03d}.png")
    images, labels = common.load_images("mvtec", str(root), 32, split="test", labels=True)
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4                   # good, then the defect types by name
    cfg = common.parse_config(common.ImageConfig, ["--dataset", "mvtec", "--data-root", str(root)])
    train, _ = common.training_set(cfg)
    assert len(train) == 18 - round(18 / 12)                                 # train/good without the hold-out
    anomaly.main(["--floors", "--dataset", "mvtec", "--data-root", str(root), "--out", str(tmp_path / "out")])
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["protocol"] for r in rows} == {"one-class", "broken_large", "crack"}
    assert all(float(r["auroc"]) == 1.0 for r in rows if r["score"] == "raw_1nn")   # negatives: far from all
    with pytest.raises(common.UserError, match="not an MVTec AD category"):
        common.load_images("mvtec", str(tmp_path), 32, split="test")


def test_bad_input_is_one_line_before_anything_is_written(tmp_path):
    for args, words in ((["--floors", "--classes", "4"], ["classes 0 to 3"]),
                        (["--floors", "--dataset", "nope"], ["unknown --dataset nope"]),
                        (["--negatives", "missing.npz", "--steps", "2"], ["--negatives missing.npz"]),
                        ([], ["give --script, --floors or --negatives"])):
        dataset = [] if "--dataset" in args else ["--dataset", "synthetic"]
        proc = run_script("anomaly", *args, *dataset, "--out", "out", cwd=tmp_path, check=False)
        assert_clean_error(proc, *words)
        assert not (tmp_path / "out" / "results.csv").exists()
