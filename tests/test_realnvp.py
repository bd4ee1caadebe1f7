"""realnvp.py: every layer's log-determinant and the whole flow's (with the logit pre-processing) against
autograd Jacobians, exact inverses, the bits/dim bookkeeping against a hand computation, batch norm as a
flow layer, the paper's settings and CIFAR-10 model, and the shared CLI contract."""
import copy
import csv
import math
import signal

import numpy as np
import pytest
import torch
from scipy import integrate

import common
import realnvp
from conftest import (check_amp_change_on_resume, check_bad_flags, check_bad_inputs, check_ddp, check_exact_resume,
                      check_sample, check_signal_resume, check_smoke, load, run_script)

SMALL = ["--dataset", "synthetic", "--image-size", 8, "--arch", "tiny", "--batch-size", 16, "--device", "cpu"]
DCGAN_SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4,
               "--device", "cpu"]
SHAPES = [(1, 4, 4), (3, 4, 4)]


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``module`` in float64 and eval mode, its parameters and running statistics moved away from their
    initial values (checkerboard tanh scales start at 0, flow batch norms at the identity), so that every
    term of a log-determinant is exercised."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.5)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
    return module.eval()


def autograd_logdet(f, x: torch.Tensor) -> float:
    """log|det df/dx| for one image x (C x H x W) from torch.autograd.functional.jacobian; f maps a batch to a
    tensor or a list of tensors, flattened and concatenated."""
    def flat(x1):
        out = f(x1.unsqueeze(0))
        return torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()
    J = torch.autograd.functional.jacobian(flat, x)
    sign, logabsdet = torch.linalg.slogdet(J.reshape(x.numel(), x.numel()))
    assert sign != 0
    return float(logabsdet)


# ----------------------------------------------------------------------------------------------
# The change of variables, layer by layer (sections 3.3-3.7, 4.1)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mask", ["checkerboard", "channel"])
@pytest.mark.parametrize("parity", [0, 1])
def test_coupling_logdet_is_the_jacobians_and_inverts(shape, mask, parity):
    """Checkerboard couplings on C x 4 x 4; channel-wise ones after a squeeze (4C x 2 x 2), whose own
    log-det is 0 (a permutation): the Jacobian is of the composition."""
    c = shape[0]
    squeeze = realnvp.Squeeze()
    if mask == "checkerboard":
        layer = randomized(realnvp.Coupling(c, 4, 8, 1, mask, parity))
        f = lambda x: layer(x)[0]                                              # noqa: E731
        logdet = lambda x: layer(x)[1]                                         # noqa: E731
    else:
        layer = randomized(realnvp.Coupling(4 * c, 2, 8, 1, mask, parity))
        f = lambda x: layer(squeeze(x)[0])[0]                                  # noqa: E731
        logdet = lambda x: squeeze(x)[1] + layer(squeeze(x)[0])[1]             # noqa: E731
    x = torch.randn(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        ld = logdet(x)
        y = f(x)
        back = layer.inverse(y) if mask == "checkerboard" else squeeze.inverse(layer.inverse(y))
    for i in range(2):
        assert float(ld[i]) == pytest.approx(autograd_logdet(f, x[i]), abs=1e-9)
    assert float(ld.abs().min()) > 0.1                           # the scales are exercised
    torch.testing.assert_close(back, x, rtol=0, atol=1e-12)
    # the conditioning half passes unchanged, the other half changes; parity 1 changes what parity 0 keeps
    if mask == "checkerboard":
        i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        kept, x_in = ((i + j + parity) % 2 == 0).expand_as(y), x
    else:
        kept, x_in = (torch.arange(4 * c) < 2 * c) == (parity == 0), squeeze(x)[0]
        kept = kept.view(1, -1, 1, 1).expand_as(y)
    assert torch.equal(y[kept], x_in[kept]) and not torch.allclose(y[~kept], x_in[~kept])


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_logdet_in_eval_mode_is_the_jacobians(shape):
    layer = randomized(realnvp.BatchNorm(shape[0]))
    x = torch.randn(2, *shape, dtype=torch.float64)
    y, ld = layer(x)
    mean, var = layer.running_mean.view(1, -1, 1, 1), layer.running_var.view(1, -1, 1, 1)
    torch.testing.assert_close(y, (x - mean) / torch.sqrt(var + realnvp.BN_EPS))
    assert float(ld[0]) == pytest.approx(autograd_logdet(lambda v: layer(v)[0], x[0]), abs=1e-10)
    assert float(ld[0]) == float(ld[1]) == pytest.approx(float(-0.5 * 16 * torch.log(var + 1e-4).sum()), abs=1e-10)
    torch.testing.assert_close(layer.inverse(y), x, rtol=0, atol=1e-12)


def test_batchnorm_in_training_uses_the_batch_statistics_and_updates_the_running_averages():
    """Training: y = (x - mu_B) / sqrt(sigma_B^2 + eps) with the minibatch's (biased) statistics, log-det
    -1/2 H W sum_c log(sigma_c^2 + eps), the same for every image; the running averages move by 0.1 towards
    the batch's. The same map in eval mode (running averages set to the batch's) has that log-det as its
    autograd Jacobian."""
    layer = realnvp.BatchNorm(3).double()
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64) * torch.tensor([0.5, 2.0, 3.0]).view(1, 3, 1, 1) + 1.5
    y, ld = layer(x)
    mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(y.var(dim=(0, 2, 3), unbiased=False), var / (var + 1e-4))
    want = -0.5 * 16 * torch.log(var + 1e-4).sum()
    torch.testing.assert_close(ld, want.expand(16))
    torch.testing.assert_close(layer.running_mean, 0.1 * mean)
    torch.testing.assert_close(layer.running_var, 0.9 + 0.1 * var)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(var)
    layer.eval()
    y_eval, ld_eval = layer(x)
    torch.testing.assert_close(y_eval, y)
    torch.testing.assert_close(ld_eval, ld)
    assert float(ld[3]) == pytest.approx(autograd_logdet(lambda v: layer(v)[0], x[3]), abs=1e-10)
    assert abs(float(ld[0])) > 1


@pytest.mark.parametrize("shape", SHAPES)
def test_logit_transform_logdet_is_the_jacobians(shape):
    x = torch.rand(2, *shape, dtype=torch.float64)
    y, ld = realnvp.logit_transform(x, 0.05)
    p = 0.05 + 0.9 * x
    torch.testing.assert_close(y, torch.log(p / (1 - p)))
    assert float(ld[0]) == pytest.approx(autograd_logdet(lambda v: realnvp.logit_transform(v, 0.05)[0], x[0]),
                                         abs=1e-10)
    torch.testing.assert_close(realnvp.logit_inverse(y, 0.05), x, rtol=0, atol=1e-12)


def test_squeeze_and_factor_out_are_permutations_and_factor_out_one_checkerboard_colour():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float64).view(2, 3, 4, 4)
    h, ld = realnvp.Squeeze()(x)
    assert h.shape == (2, 12, 2, 2) and torch.equal(ld, torch.zeros(2))
    assert torch.equal(h[:, 4 * 1 + 2 * 1 + 0], x[:, 1, 1::2, 0::2])     # channel 4k + 2 dy + dx
    keep, z = realnvp.factor_out(h)
    assert keep.shape == z.shape == (2, 6, 2, 2)
    torch.testing.assert_close(keep, torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 1::2]], dim=1))
    torch.testing.assert_close(z, torch.cat([x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2]], dim=1))
    assert torch.equal(realnvp.factor_in(keep, z), h)
    assert torch.equal(realnvp.Squeeze().inverse(h), x)


@pytest.mark.parametrize("shape", SHAPES)
def test_whole_flow_logdet_including_the_preprocessing_is_the_jacobians(shape):
    """x~ -> logit -> 2 scales (checkerboard, squeeze, channel-wise, factor out; 4 checkerboards), every batch
    norm at its running averages: log|det dz/dx~| equals autograd's, and the inverse is exact."""
    model = randomized(realnvp.RealNVP(shape[0], 4, 2, 1, 4, alpha=0.05))
    x = torch.rand(2, *shape, dtype=torch.float64)
    with torch.no_grad():
        zs, ld = model(x)
    assert [z.shape[1:] for z in zs] == [torch.Size(s) for s in model.z_shapes]
    assert sum(math.prod(s) for s in model.z_shapes) == math.prod(shape)
    for i in range(2):
        assert float(ld[i]) == pytest.approx(autograd_logdet(lambda v: model(v)[0], x[i]), abs=1e-8)
    torch.testing.assert_close(model.inverse(zs), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch, shape", [("small", (1, 28, 28)), ("tiny", (3, 8, 8))])
def test_inverse_of_forward_in_float32(arch, shape):
    """The default model on 28 x 28 (its last scale is 4 x 7 x 7, an odd checkerboard) after training-mode
    passes have moved its running averages: inverse(forward(x)) == x to 1e-5."""
    torch.manual_seed(0)
    model = realnvp.RealNVP(shape[0], shape[1], *realnvp.ARCHS[arch])
    with torch.no_grad():
        for coupling in (m for m in model.modules() if isinstance(m, realnvp.Coupling)):
            coupling.scale.fill_(1.0)
        for _ in range(3):
            model(realnvp.dequantize(torch.randint(0, 256, (16, *shape)).float()))
        model.eval()
        x = realnvp.dequantize(torch.randint(0, 256, (4, *shape)).float())
        zs, _ = model(x)
        assert max(float(z.abs().max()) for z in zs) > 1
        torch.testing.assert_close(model.inverse(zs), x, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Bits per dimension of the 8-bit pixels
# ----------------------------------------------------------------------------------------------
def test_identity_flow_bits_per_dim_on_uniform_noise_is_the_hand_computed_value():
    """The flow z = y = logit(alpha + (1 - 2 alpha) x~) alone (no coupling): on one image, its bits/dim
    is the sum written out by hand in numpy; on uniform noise (pixels uniform, so x~ ~ U[0, 1)^D), its mean
    is (1/log 2) (integral_0^1 [y(x)^2/2 + log(2 pi)/2 - log|dy/dx|] dx + log 256)."""
    alpha = 0.05
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (16, 1, 256, 256), generator=g).float()
    x = realnvp.dequantize(pixels, g).double()
    y, ld = realnvp.logit_transform(x, alpha)
    bpd = realnvp.bits_per_dim(-(realnvp.log_prior([y]) + ld), 256 * 256)
    v = x[0].numpy().ravel()
    p = alpha + (1 - 2 * alpha) * v
    nats = np.sum(0.5 * np.log(p / (1 - p)) ** 2 + 0.5 * np.log(2 * np.pi) + np.log(p * (1 - p) / (1 - 2 * alpha)))
    assert float(bpd[0]) == pytest.approx((nats / v.size + np.log(256)) / np.log(2), rel=1e-12)

    def per_dim(u):
        q = alpha + (1 - 2 * alpha) * u
        return 0.5 * np.log(q / (1 - q)) ** 2 + 0.5 * np.log(2 * np.pi) + np.log(q * (1 - q) / (1 - 2 * alpha))
    expected = (integrate.quad(per_dim, 0, 1)[0] + np.log(256)) / np.log(2)
    assert 7.5 < expected < 8.5       # about 8 bits: noise costs its 8 bits, plus the Gaussian's mismatch
    assert float(bpd.mean()) == pytest.approx(expected, abs=3e-3)   # 1M dimensions: s.e. 1e-3


def test_evaluate_bpd_is_the_mean_of_each_images_bits_per_dim():
    torch.manual_seed(0)
    model = realnvp.RealNVP(1, 8, *realnvp.ARCHS["tiny"]).train()
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    got = realnvp.evaluate_bpd(model, images, batch=2, seed=3)
    assert model.training                                     # restored
    g = torch.Generator().manual_seed(3)
    model.eval()
    with torch.no_grad():
        bpd = [realnvp.bits_per_dim(-(realnvp.log_prior(zs) + ld), 64)
               for zs, ld in (model(realnvp.dequantize(images[i:i + 2].float(), g)) for i in (0, 2, 4))]
    assert got == pytest.approx(float(torch.cat(bpd).mean()), rel=1e-6)
    assert realnvp.evaluate_bpd(model, images, should_stop=lambda: True) is None


# ----------------------------------------------------------------------------------------------
# The paper's settings and model
# ----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = realnvp.Config()
    assert (cfg.lr, cfg.batch_size, cfg.l2, cfg.alpha) == (1e-3, 64, 5e-5, 0.05)          # section 4.1
    assert (cfg.grad_clip, cfg.temperature, cfg.hflip) == (100.0, 1.0, False)              # official code; T = 1
    assert (realnvp.BN_MOMENTUM, realnvp.BN_EPS) == (0.1, 1e-4)                            # official code
    assert realnvp.ARCHS["cifar10"] == (2, 8, 64)     # "8 residual blocks, 64 feature maps, downscale only once"


def test_parameter_count_and_layout_of_the_papers_cifar10_model():
    model = realnvp.RealNVP(3, 32, *realnvp.ARCHS["cifar10"])
    assert common.count_parameters(model) == 19_637_884
    couplings = [m for m in model.modules() if isinstance(m, realnvp.Coupling)]
    assert [c.checkerboard for c in couplings] == [True] * 3 + [False] * 3 + [True] * 4
    assert [c.parity for c in couplings] == [0, 1, 0] * 2 + [0, 1, 0, 1]   # alternating masks
    assert [c.st.conv_in.out_channels for c in couplings] == [64] * 3 + [128] * 7
    assert all(len(c.st.blocks) == 8 for c in couplings)
    assert model.z_shapes == [(6, 16, 16), (6, 16, 16)]
    assert sum(isinstance(m, realnvp.BatchNorm) for m in model.modules()) == 10   # one after every coupling
    assert common.count_parameters(realnvp.RealNVP(1, 28, *realnvp.ARCHS["small"])) == 1_452_642   # docstring


def tiny_step(l2: float, clip: float = 1e9):
    torch.manual_seed(0)
    model = realnvp.RealNVP(1, 8, *realnvp.ARCHS["tiny"]).double()   # float64: the differences are small
    with torch.no_grad():
        for p in realnvp.weight_scales(model):
            p.add_(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=0.0)
    cfg = realnvp.Config(l2=l2, grad_clip=clip)
    x = torch.randint(0, 256, (8, 1, 8, 8)).double()
    torch.manual_seed(1)
    out = realnvp.train_step(model, opt, x, realnvp.weight_scales(model), cfg)
    return model, out


def test_the_prior_covers_every_scales_z_once():
    torch.manual_seed(0)
    model = realnvp.RealNVP(1, 8, *realnvp.ARCHS["tiny"]).eval()
    zs, _ = model(torch.rand(3, 1, 8, 8))
    z = torch.cat([z.flatten(1) for z in zs], 1)
    assert len(zs) >= 2 and z.shape == (3, 64)
    torch.testing.assert_close(realnvp.log_prior(zs), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1))


def test_train_step_flips_dequantizes_and_descends_the_mean_nll():
    """--hflip mirrors about half the images left to right, x~ = (x + u) / 256, and the gradient is that of the
    batch's mean -log p(x~) plus the L2 penalty (a sum would weaken the penalty and the clip by the batch size)."""
    torch.manual_seed(0)
    model = realnvp.RealNVP(1, 8, *realnvp.ARCHS["tiny"]).double()
    twin = copy.deepcopy(model)
    x = torch.arange(64.0, dtype=torch.float64).view(1, 1, 8, 8).expand(8, 1, 8, 8) * 4   # left-right asymmetric
    cfg = realnvp.Config(hflip=True, grad_clip=1e9)
    torch.manual_seed(1)   # train_step's draws, in its order: the flips, then u
    flip = torch.rand(8) < 0.5
    zs, logdet = twin(realnvp.dequantize(torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)))
    nll = -(realnvp.log_prior(zs) + logdet)
    loss = nll.mean() + cfg.l2 * sum(g.pow(2).sum() for g in realnvp.weight_scales(twin))
    grads = torch.autograd.grad(loss, list(twin.parameters()))
    torch.manual_seed(1)
    out = realnvp.train_step(model, torch.optim.Adam(model.parameters(), lr=0.0), x, realnvp.weight_scales(model),
                             cfg)
    assert 0 < flip.sum() < 8
    assert out["bpd"].item() == pytest.approx(realnvp.bits_per_dim(nll, 64).mean().item(), rel=1e-10)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_l2_penalty_is_on_the_weight_scales_only_and_gradients_are_clipped():
    """The penalty 5e-5 sum g^2 adds 2 * 5e-5 * g to the gradient of every weight-norm g and coupling scale,
    and nothing to any other parameter; the gradient's global norm is clipped at grad_clip."""
    plain, _ = tiny_step(0.0)
    penalized, _ = tiny_step(5e-5)
    scales = {id(p) for p in realnvp.weight_scales(penalized)}
    n_wn = sum(isinstance(m, realnvp.WNConv2d) for m in penalized.modules())
    assert len(scales) == n_wn + sum(isinstance(m, realnvp.Coupling) for m in penalized.modules())
    for (name, a), b in zip(penalized.named_parameters(), plain.parameters()):
        extra = 2 * 5e-5 * a.detach() if id(a) in scales else torch.zeros_like(a)
        torch.testing.assert_close(a.grad - b.grad, extra, rtol=1e-6, atol=1e-10, msg=name)
    clipped, out = tiny_step(0.0, clip=1.0)
    norm = torch.norm(torch.stack([p.grad.norm() for p in clipped.parameters()]))
    assert float(out["grad_norm"]) > 1 and float(norm) == pytest.approx(1.0, rel=1e-4)


def test_sampling_temperature():
    """z ~ N(0, T^2 I): T scales every scale's z; T = 0 gives the image of z = 0 for every sample. Each pixel is
    the bin k = floor(256 x~) of the flow's x~, as k / 255 (exactly the uint8 k once written)."""
    torch.manual_seed(0)
    model = realnvp.RealNVP(1, 8, *realnvp.ARCHS["tiny"]).eval()
    a = realnvp.sample(model, 6, 0.7, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    zs = [0.7 * torch.randn((6, *s), generator=g) for s in model.z_shapes]
    with torch.no_grad():
        x = model.inverse(zs)
    torch.testing.assert_close(a, (256 * x).floor().clamp(0, 255) / 255)
    assert torch.equal(common.to_uint8(a, (0, 1)).long(), (256 * x).floor().clamp(0, 255).long())
    cold = realnvp.sample(model, 3, 0.0)
    assert torch.equal(cold[0], cold[2]) and a.std(dim=0).mean() > 0.01
    assert a.min() >= 0 and a.max() <= 1 and a.shape == (6, 1, 8, 8)


# ----------------------------------------------------------------------------------------------
# The shared contract
# ----------------------------------------------------------------------------------------------
def test_smoke_and_adam_with_the_papers_settings(tmp):
    check_smoke("realnvp", SMALL, tmp)
    group = load(tmp / "smoke" / "ckpt.pt")["optimizers"]["model"]["param_groups"][0]
    assert group["lr"] == 1e-3 and group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8   # Adam's defaults
    assert group["weight_decay"] == 0 and not group["amsgrad"]   # the L2 penalty is in the loss


def test_exact_resume_with_amp_and_flips(tmp):
    check_exact_resume("realnvp", [*SMALL, "--amp", "--hflip"], tmp)


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("realnvp", SMALL, tmp, signal.SIGTERM)


def test_sample(tmp):
    check_sample("realnvp", SMALL, tmp)


def test_bad_inputs(tmp):
    check_bad_inputs("realnvp", SMALL, "dcgan", DCGAN_SMALL, tmp)


def test_bad_flags(tmp):
    check_bad_flags("realnvp", SMALL, tmp, [
        (["--arch", "huge"], ["--arch"]),
        (["--arch", "small", "--image-size", 30], ["--image-size 30", "multiple of 4"]),
        (["--bpd", 3, "--sample", 2], ["two commands"]), (["--alpha", 0.5], ["--alpha"]),
        (["--temperature", -1], ["--temperature -1"]),
        (["--grad-clip", 0], ["--grad-clip 0", "above 0"])])


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    check_ddp("realnvp", SMALL, tmp)


def test_recalibrate_sets_the_running_averages_to_the_mean_minibatch_statistics():
    """After recalibrate, each flow batch norm's running mean and variance are the averages of what it saw in
    each of the minibatches (batch statistics, biased variance); the weights do not move."""
    torch.manual_seed(0)
    model = realnvp.RealNVP(1, 8, *realnvp.ARCHS["tiny"])
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    images = (torch.rand(40, 1, 8, 8) * 256).to(torch.uint8)
    norm = next(m for m in model.modules() if isinstance(m, realnvp.BatchNorm))
    seen = []
    norm.register_forward_hook(lambda m, i, o: seen.append((i[0].mean((0, 2, 3)), i[0].var((0, 2, 3), unbiased=False))))
    realnvp.recalibrate(model, images, batches=3, batch_size=8, seed=1)
    assert len(seen) == 3 and not model.training
    torch.testing.assert_close(norm.running_mean, sum(m for m, _ in seen) / 3)
    torch.testing.assert_close(norm.running_var, sum(v for _, v in seen) / 3)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items() if k in weights)


def test_bpd_command_eval_every_and_load(tmp):
    """--eval-every with --eval-bpd logs the test bits/dim (test_bpd); --bpd N prints the same number for the
    same checkpoint; load() gives the model in eval mode with the checkpoint's weights and running averages."""
    out = tmp / "bpd"
    run_script("realnvp", *SMALL, "--steps", 4, "--eval-every", 2, "--eval-bpd", 20, "--eval-features", "inception",
               "--out", out, cwd=tmp, env={"TORCH_HOME": str(tmp / "no-weights")})
    with open(out / "metrics.csv", newline="") as f:
        bpd = [float(r["test_bpd"]) for r in csv.DictReader(f) if r.get("test_bpd")]
    assert len(bpd) == 2 and all(1 < b < 12 for b in bpd)
    proc = run_script("realnvp", "--out", out, "--bpd", 20, "--recalibrate", 3, cwd=tmp)
    assert float(proc.stdout.split("test_bpd: ")[1].split()[0]) == pytest.approx(bpd[-1], rel=1e-4)
    recalibrated = float(proc.stdout.split("test_bpd_recalibrated: ")[1].split()[0])
    assert 1 < recalibrated < 12 and recalibrated != pytest.approx(bpd[-1], rel=1e-4)
    model = realnvp.load(out / "ckpt.pt")
    saved = load(out / "ckpt.pt")["models"]["model"]
    assert not model.training and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    test = common.load_images("synthetic", "data", 8, split="test")[:20]
    assert realnvp.evaluate_bpd(model, test) == pytest.approx(bpd[-1], rel=1e-5)
    images = realnvp.sample(model, 2, temperature=0.7)
    assert images.shape == (2, 1, 8, 8) and 0 <= images.min() and images.max() <= 1


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def test_amp_may_change_on_resume_fp16_included(tmp):
    """fp16's GradScaler skips the first steps (their gradients overflow): the logged gradient norm of a skipped step
    is not a divergence."""
    check_amp_change_on_resume("realnvp", SMALL, tmp)
