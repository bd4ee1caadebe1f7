"""acgan.py: the auxiliary classifier's objective in closed form, dcgan's networks with the class input and the
class logits, samples of class c that a classifier calls c, and the shared CLI contract."""
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acgan
import common
import dcgan
from conftest import (check_bad_flags, check_bad_inputs, check_conditional_sample, check_ddp, check_exact_resume,
                      check_samples_are_of_their_class, check_signal_resume, check_smoke, load, run_script)

SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4, "--device", "cpu"]
DCGAN_SMALL = SMALL


def test_defaults_are_dcgans():
    cfg, paper = acgan.Config(), dcgan.Config()
    for name in ("lr", "beta1", "beta2", "batch_size", "nz", "ngf", "ndf", "leak", "init_std", "image_size"):
        assert getattr(cfg, name) == getattr(paper, name), name


def test_parameter_counts_are_dcgans_plus_the_class_input_and_the_class_logits():
    """At 64 x 64 x 3 with K = 10: G's first layer takes 110 channels (z and the one-hot c: 10 x 512 x 4 x 4 more
    weights than dcgan's 3,576,704), D's last one gives 11 logits (10 x 512 x 4 x 4 more than 2,765,568)."""
    G, D = acgan.Generator(100, 10, 64, 3, 64), acgan.Discriminator(64, 10, 3, 64, 0.2)
    assert common.count_parameters(G) == 3_576_704 + 10 * 512 * 16 == 3_658_624
    assert common.count_parameters(D) == 2_765_568 + 10 * 512 * 16 == 2_847_488
    s, c = D(G(torch.tensor([0, 9]), acgan.sample_z(2, 100, "cpu")))
    assert s.shape == (2,) and c.shape == (2, 10)


def test_batch_norm_is_pytorchs_not_the_popular_implementations_eps_0_8():
    G, D = acgan.build(acgan.Config(dataset="synthetic", image_size=16, ngf=4, ndf=4), "cpu")
    norms = [m for m in [*G.modules(), *D.modules()] if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.eps == 1e-5 and m.momentum == 0.1 for m in norms)


def test_the_class_input_is_one_hot_and_concatenated_to_z():
    G = acgan.Generator(3, 4, 4, 1, 16)
    first = G.net[0]
    z = torch.randn(2, 3)
    h = torch.cat([z, torch.eye(4)[[1, 3]]], dim=1).view(2, 7, 1, 1)
    torch.testing.assert_close(G.net[:1](h), first(h))
    with torch.no_grad():
        assert torch.allclose(G(torch.tensor([1, 3]), z), G.net(h), atol=1e-6)


class LinearG(nn.Module):
    """A tiny stand-in G: a linear map of [z, one-hot c] to a 1 x 2 x 2 image, so that the losses can be written."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, c, z):
        return (torch.cat([z, F.one_hot(c, 3).float()], 1) @ self.weight).view(-1, 1, 2, 2)


class LinearD(nn.Module):
    """A tiny stand-in D: a linear map of the image to (source logit, 3 class logits)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x):
        out = x.flatten(1) @ self.weight
        return out[:, 0], out[:, 1:]


def test_train_step_is_the_papers_objective_with_class_cross_entropy_on_logits():
    """D minimizes BCE(source) + CE(class) on real and fake images, G the non-saturating source term plus the
    class term; CE takes D's raw class logits (log-softmax applied once: the popular implementation's extra
    softmax would change every number here)."""
    torch.manual_seed(0)
    G, D = LinearG(torch.randn(2 + 3, 4) * 0.3), LinearD(torch.randn(4, 1 + 3) * 0.3)   # z of 2, K = 3, 2 x 2 images
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 1, 0])
    cfg = acgan.Config(nz=2)
    torch.manual_seed(1)
    z, c = acgan.sample_z(5, 2, "cpu"), torch.randint(3, (5,))                  # train_step's draws, in its order
    with torch.no_grad():
        fake = G(c, z)
        (s_real, c_real), (s_fake, c_fake) = D(x), D(fake)
    bce = F.binary_cross_entropy_with_logits
    loss_S = bce(s_real, torch.ones(5)) + bce(s_fake, torch.zeros(5))
    loss_C = F.cross_entropy(c_real, y) + F.cross_entropy(c_fake, c)
    torch.manual_seed(1)
    losses = acgan.train_step(G, D, torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0),
                              x, y, 3, cfg)
    assert losses["loss_C"].item() == pytest.approx(loss_C.item(), rel=1e-6)
    assert losses["loss_D"].item() == pytest.approx((loss_S + loss_C).item(), rel=1e-6)
    assert losses["loss_G"].item() == pytest.approx((bce(s_fake, torch.ones(5)) + F.cross_entropy(c_fake, c)).item(),
                                                    rel=1e-6)


def test_smoke(tmp):
    check_smoke("acgan", SMALL, tmp)
    from PIL import Image
    assert Image.open(tmp / "smoke" / "samples" / "000004.png").size == (8 * 18 + 2, 4 * 18 + 2)   # a row per class


def test_exact_resume(tmp):
    check_exact_resume("acgan", SMALL, tmp)


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("acgan", SMALL, tmp, signal.SIGTERM)


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    check_ddp("acgan", SMALL, tmp)


def test_sample_writes_each_class_alike_with_its_labels(tmp):
    check_conditional_sample("acgan", SMALL, tmp)


def test_samples_of_class_c_are_classified_c(tmp):
    check_samples_are_of_their_class("acgan", [*SMALL, "--batch-size", 32, "--ngf", 16, "--ndf", 16], tmp, steps=300)


def test_per_class_trains_on_the_subset_and_records_it(tmp):
    run_script("acgan", *SMALL, "--per-class", 8, "--subset-seed", 2, "--steps", 1, "--out", tmp / "sub", cwd=tmp)
    ckpt = load(tmp / "sub" / "ckpt.pt")
    assert (ckpt["config"]["per_class"], ckpt["config"]["subset_seed"]) == (8, 2)
    assert ckpt["data"]["train"] == {"epoch": 0, "index": 1}   # 32 images: 2 batches of 16 an epoch
    run_script("acgan", "--out", tmp / "sub", "--sample", 4, "--sample-out", tmp / "sub.npz", cwd=tmp)
    import numpy as np
    saved = np.load(tmp / "sub.npz")
    assert (int(saved["per_class"]), int(saved["subset_seed"])) == (8, 2)
    run_script("acgan", *SMALL, "--per-class", 8, "--steps", 1, "--out", tmp / "seed0", cwd=tmp)   # seed 0 too
    run_script("acgan", "--out", tmp / "seed0", "--sample", 4, "--sample-out", tmp / "seed0.npz", cwd=tmp)
    saved = np.load(tmp / "seed0.npz")
    assert (int(saved["per_class"]), int(saved["subset_seed"])) == (8, 0)


def test_bad_inputs(tmp):
    check_bad_inputs("acgan", SMALL, "dcgan", DCGAN_SMALL, tmp)


def test_bad_flags(tmp):
    (tmp / "imgs").mkdir()
    check_bad_flags("acgan", SMALL, tmp, [(["--class", 1], ["--class goes with --sample"]),
                                          (["--dataset", "folder", "--data-root", tmp / "imgs"], ["no labels"]),
                                          (["--per-class", 500], ["--per-class 500"])])
