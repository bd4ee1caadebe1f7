"""ddpm.py: the paper's schedules and closed forms, the bound term by term, the samplers, the official
parameter count, and the shared CLI contract (resume with the EMA, signals, DDP, split --sample)."""
import math
import signal
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.distributions import Normal, kl_divergence

import common
import ddpm
from conftest import (assert_clean_error, check_amp_change_on_resume, check_bad_flags, check_bad_inputs,
                      check_compile, check_conditional_sample, check_ddp, check_exact_resume, check_sample,
                      check_samples_are_of_their_class, check_signal_resume, check_smoke, load, run_script,
                      start_script)

SMALL = ["--dataset", "synthetic", "--image-size", 8, "--arch", "tiny", "--T", 10, "--batch-size", 16,
         "--device", "cpu"]
DCGAN_SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4,
               "--device", "cpu"]


@pytest.fixture(scope="module")
def diffusion():
    return ddpm.Diffusion(1000, 1e-4, 0.02)


class Toy(nn.Module):
    """A fixed, non-trivial noise predictor for the sampler tests."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, t):
        return torch.tanh(self.w * x + t.float().view(-1, 1, 1, 1) / 7)


# ----------------------------------------------------------------------------------------------
# The paper's settings
# ----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = ddpm.Config()
    assert (cfg.T, cfg.beta_1, cfg.beta_T, cfg.var, cfg.sampler) == (1000, 1e-4, 0.02, "beta", "ddpm")
    assert (cfg.lr, cfg.warmup, cfg.grad_clip, cfg.ema_decay, cfg.batch_size, cfg.dropout) == \
        (2e-4, 5000, 1.0, 0.9999, 128, 0.1)
    assert ddpm.ARCHS["cifar10"] == (128, (1, 2, 2, 2), 2) and cfg.beta_schedule == "linear"


def test_parameter_count_is_the_official_cifar10_unet():
    cfg = ddpm.Config(dataset="cifar10", arch="cifar10")
    net = ddpm.build(cfg, "cpu")
    assert common.count_parameters(net) == 35_746_307
    # attention at 16 x 16 (2 blocks down, 3 up) and in the middle
    assert sum(isinstance(m, ddpm.Attention) for m in net.modules()) == 2 + 3 + 1
    assert net(torch.randn(2, 3, 32, 32), torch.tensor([1, 1000])).shape == (2, 3, 32, 32)
    small = ddpm.build(ddpm.Config(), "cpu")
    assert common.count_parameters(small) == 1_623_169   # the docstring's figure


def attention_sizes(net: nn.Module, size: int, channels: int = 3) -> list[int]:
    """The side of the feature maps each Attention layer of ``net`` sees on a size x size input."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[-1]))
             for m in net.modules() if isinstance(m, ddpm.Attention)]
    with torch.no_grad():
        net(torch.randn(1, channels, size, size), torch.tensor([1]))
    for h in hooks:
        h.remove()
    return sizes


@pytest.mark.parametrize("size, middle", [(32, 4), (64, 8)])
def test_cifar10_attention_is_at_16x16_whatever_the_image_size(size, middle):
    """The paper's "self-attention at the 16 x 16 resolution": at 32 x 32 the level 1 maps, at 64 x 64 level 2
    (not level 1's 32 x 32, 16 times the attention cost); the middle block's attention as well."""
    cfg = ddpm.Config(dataset="cifar10", arch="cifar10", image_size=size)
    assert attention_sizes(ddpm.UNet(3, 32, (1, 2, 2, 2), 1, (ddpm.attention_level(cfg),), 0.0), size) == \
        [16, middle, 16, 16]
    small = ddpm.Config(arch="small")
    assert ddpm.attention_level(small) == 1
    assert attention_sizes(ddpm.build(small, "cpu"), 28, 1) == [14, 14, 7, 14, 14, 14]


def test_a_checkpoint_keeps_the_attention_it_was_built_with(tmp):
    """The level is recorded; a checkpoint that predates the record keeps level 1, where it was built."""
    run_script("ddpm", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    ckpt = load(tmp / "run" / "ckpt.pt")
    assert ckpt["config"]["attn_level"] == 1
    del ckpt["config"]["attn_level"]
    ckpt["config"].update(arch="cifar10", image_size=64, dataset="cifar10")
    torch.save(ckpt, tmp / "old.pt")
    cfg, _ = common.load_config(ddpm.Config, tmp / "old.pt", "ddpm")
    assert ddpm.attention_level(cfg) == 1   # the 32 x 32 level it was trained with, not today's 16 x 16


def test_a_short_chain_is_said_and_the_scaled_schedule_reaches_noise(tmp):
    """alpha_bar_T is printed; far from 0 (--T 10 with the paper's betas) it comes with a warning that says
    what to do. --beta-schedule scaled (betas times 1000 / T) ends near N(0, I) at T = 100 and is recorded."""
    proc = run_script("ddpm", *SMALL, "--steps", 1, "--out", tmp / "short", cwd=tmp)
    assert "alpha_bar_T = 0.904" in proc.stdout
    assert "warning: alpha_bar_T = 0.904" in proc.stderr and "--beta-schedule scaled" in proc.stderr
    assert ddpm.beta_range(ddpm.Config(T=100, beta_schedule="scaled")) == pytest.approx((1e-3, 0.2))
    assert ddpm.beta_range(ddpm.Config(T=10, beta_schedule="scaled")) == pytest.approx((1e-2, 0.999))
    scaled = ["--T", 100, "--beta-schedule", "scaled"]
    proc = run_script("ddpm", *SMALL, *scaled, "--steps", 1, "--out", tmp / "scaled", cwd=tmp)
    assert "warning" not in proc.stderr and load(tmp / "scaled" / "ckpt.pt")["config"]["beta_schedule"] == "scaled"
    _, diffusion = ddpm.load(tmp / "scaled" / "ckpt.pt")
    assert diffusion.alpha_bar_list[-1] < 1e-4


def test_optimizer_is_adam_with_the_papers_settings(tmp):
    run_script("ddpm", *SMALL, "--steps", 1, "--out", tmp / "opt", cwd=tmp)
    group = load(tmp / "opt" / "ckpt.pt")["optimizers"]["model"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and group["eps"] == 1e-8 and group["weight_decay"] == 0
    assert not group["amsgrad"] and group["lr"] == 0.0   # the warm-up's first update (step 0)


def test_warmup_clipping_and_ema():
    """lr of update s is 2e-4 min(s / 5000, 1); the gradient's norm is clipped at 1; the EMA moves by
    (1 - decay) towards the new weights."""
    cfg = ddpm.Config(T=10, warmup=5000, grad_clip=1.0, ema_decay=0.9)
    torch.manual_seed(0)
    model = ddpm.UNet(1, *ddpm.ARCHS["tiny"], (1,), 0.0)
    ema = ddpm.EMA(model, cfg.ema_decay)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    diffusion = ddpm.Diffusion(10, 1e-4, 0.02)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    for step, lr in ((0, 0.0), (2500, 1e-4), (5000, 2e-4), (9000, 2e-4)):
        before = [p.detach().clone() for p in model.parameters()]
        ema_before = [p.clone() for p in ema.model.parameters()]
        out = ddpm.train_step(model, ema, opt, diffusion, x0 * 100, step, cfg)   # huge inputs: a clipped gradient
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)
        norm = torch.norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert out["grad_norm"] > 1 and norm == pytest.approx(1.0, rel=1e-4)
        for e0, e1, p in zip(ema_before, ema.model.parameters(), model.parameters()):
            torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * p.detach(), rtol=1e-5, atol=1e-7)
        if step == 0:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))   # lr 0


# ----------------------------------------------------------------------------------------------
# The forward process and its posterior (eq. 4, 6, 7)
# ----------------------------------------------------------------------------------------------
def test_schedule_in_float64(diffusion):
    beta = np.linspace(1e-4, 0.02, 1000)
    assert diffusion.beta.dtype == torch.float64 and diffusion.beta[0] == 0
    np.testing.assert_allclose(diffusion.beta[1:].numpy(), beta, rtol=1e-15)
    np.testing.assert_allclose(diffusion.alpha_bar[1:].numpy(), np.cumprod(1 - beta), rtol=1e-13)
    assert diffusion.alpha_bar[0] == 1 and float(diffusion.alpha_bar[1000]) == pytest.approx(4.04e-5, rel=0.01)


def test_reverse_variances():
    """sigma_t^2 = beta_t (--var beta) or beta_tilde_t (--var beta-tilde) for t >= 2; sigma_1^2 = beta_tilde_2 under
    both (the official code's clipped log variance); their logs are theirs."""
    for var, expected in (("beta", "beta"), ("beta-tilde", "beta_tilde")):
        d = ddpm.Diffusion(1000, 1e-4, 0.02, var=var)
        torch.testing.assert_close(d.sigma2[2:], getattr(d, expected)[2:], rtol=0, atol=0)
        assert d.sigma2[1] == d.beta_tilde[2] and d.beta_tilde[2] > 0
        torch.testing.assert_close(d.log_sigma2[1:], d.sigma2[1:].log(), rtol=1e-15, atol=0)


def test_posterior_is_bayes_rule(diffusion):
    """beta_tilde and mu_tilde (eq. 7) against the product of q(x_t | x_{t-1}) and q(x_{t-1} | x_0),
    computed from the Gaussians' precisions."""
    x0, xt = torch.randn(6, 1, 2, 2, dtype=torch.float64), torch.randn(6, 1, 2, 2, dtype=torch.float64)
    for t in (2, 10, 500, 1000):
        a, ab_prev, b = diffusion.alpha[t], diffusion.alpha_bar[t - 1], diffusion.beta[t]
        precision = 1 / (1 - ab_prev) + a / b
        mean = (ab_prev.sqrt() * x0 / (1 - ab_prev) + a.sqrt() * xt / b) / precision
        assert float(diffusion.beta_tilde[t]) == pytest.approx(float(1 / precision), rel=1e-10)
        coef = diffusion.coef_x0[t] * x0 + diffusion.coef_xt[t] * xt
        torch.testing.assert_close(coef, mean, rtol=1e-10, atol=1e-12)
        seed = (a.sqrt() * (1 - ab_prev) * xt + b * ab_prev.sqrt() * x0) / (1 - diffusion.alpha_bar[t])  # the notes
        torch.testing.assert_close(coef, seed, rtol=1e-10, atol=1e-12)


def test_q_sample_moments(diffusion):
    x0 = torch.full((200_000, 1, 1, 1), 0.6)
    for t in (1, 300, 1000):
        tt = torch.full((len(x0),), t)
        xt = diffusion.q_sample(x0, tt, torch.randn_like(x0))
        ab = float(diffusion.alpha_bar[t])
        assert float(xt.mean()) == pytest.approx(math.sqrt(ab) * 0.6, abs=0.005)
        assert float(xt.var()) == pytest.approx(1 - ab, rel=0.01, abs=2e-6)


def test_perfect_noise_predictor_gives_the_posterior_mean(diffusion):
    """eps_theta = the true eps of x_t (known x_0): the predicted x_0 is x_0, and one reverse step's mean is
    mu_tilde(x_t, x_0)."""
    x0 = torch.rand(5, 1, 4, 4) * 1.8 - 0.9
    for t in (1, 2, 250, 1000):
        tt = torch.full((5,), t)
        eps = torch.randn_like(x0)
        xt = diffusion.q_sample(x0, tt, eps)
        mean, x0_hat = diffusion.p_mean(lambda x, t_: eps, xt, tt)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-4, atol=2e-3 if t == 1000 else 1e-4)
        torch.testing.assert_close(mean, diffusion.posterior(x0, xt, tt)[0], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The bound, term by term (eq. 5, 13)
# ----------------------------------------------------------------------------------------------
def test_vlb_terms_are_direct_kls_and_the_discretized_decoder(diffusion):
    torch.manual_seed(1)
    model = Toy()
    x0 = torch.randint(0, 256, (4, 1, 3, 3)).float() / 127.5 - 1
    x0[0, 0, 0, 0], x0[1, 0, 0, 0] = -1.0, 1.0   # the edge bins, stretched to infinity
    for t in (1, 2, 700):
        tt = torch.full((4,), t)
        g = torch.Generator().manual_seed(3)
        got = ddpm.vlb_terms(model, diffusion, x0, tt, g)
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
        xt = diffusion.q_sample(x0, tt, eps)
        mean, _ = diffusion.p_mean(model, xt, tt)
        std = diffusion.at(diffusion.sigma2, tt).sqrt()
        if t > 1:
            q = Normal(diffusion.posterior(x0, xt, tt)[0], diffusion.at(diffusion.beta_tilde, tt).sqrt())
            want = kl_divergence(q, Normal(mean, std)).flatten(1).mean(1)
        else:   # -log of the decoder's mass over each pixel's bin
            p = Normal(mean.double(), std.double())
            upper = torch.where(x0 > 0.999, torch.tensor(1.0, dtype=torch.float64), p.cdf(x0.double() + 1 / 255))
            lower = torch.where(x0 < -0.999, torch.tensor(0.0, dtype=torch.float64), p.cdf(x0.double() - 1 / 255))
            want = -(upper - lower).clamp(min=1e-12).log().flatten(1).mean(1).float()
        torch.testing.assert_close(got, want / math.log(2), rtol=1e-4, atol=1e-5)
    prior = ddpm.prior_bpd(diffusion, x0)
    ab = float(diffusion.alpha_bar[1000])
    want = kl_divergence(Normal(math.sqrt(ab) * x0, math.sqrt(1 - ab)), Normal(0.0, 1.0)).flatten(1).mean(1)
    torch.testing.assert_close(prior, want / math.log(2), rtol=1e-4, atol=1e-7)   # float32 of values ~1e-5
    assert float(prior.max()) < 1e-4   # L_T is negligible at T = 1000


def test_vlb_bpd_is_the_sum_of_every_term():
    diffusion = ddpm.Diffusion(5, 1e-3, 0.2)
    model = Toy()
    images = torch.randint(0, 256, (3, 1, 2, 2), dtype=torch.uint8)
    got = ddpm.vlb_bpd(model, diffusion, images, batch=2, seed=4)
    x0 = images.float() / 127.5 - 1
    g = torch.Generator().manual_seed(4)
    total = ddpm.prior_bpd(diffusion, x0[:2])
    for t in range(5, 0, -1):
        total = total + ddpm.vlb_terms(model, diffusion, x0[:2], torch.full((2,), t), g)
    rest = ddpm.prior_bpd(diffusion, x0[2:])
    for t in range(5, 0, -1):
        rest = rest + ddpm.vlb_terms(model, diffusion, x0[2:], torch.full((1,), t), g)
    assert got == pytest.approx(float(torch.cat([total, rest]).mean()), rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Sampling: Algorithm 2 and DDIM
# ----------------------------------------------------------------------------------------------
def test_ddim_with_all_steps_and_eta_1_is_the_ancestral_sampler():
    """S = T, eta = 1: s_t^2 = beta_tilde_t, so DDIM's step (clipped x_0, eps re-derived) is Algorithm 2
    with sigma^2 = beta_tilde: the same images from the same noise, not only the same statistics."""
    diffusion = ddpm.Diffusion(50, 1e-3, 0.05, var="beta-tilde")
    model = Toy()
    a = ddpm.sample(model, diffusion, 64, (1, 4, 4), "ddpm", generator=torch.Generator().manual_seed(0))
    b = ddpm.sample(model, diffusion, 64, (1, 4, 4), "ddim", steps=50, eta=1.0,
                    generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1


def test_ddim_eta_0_is_deterministic_and_its_steps():
    diffusion = ddpm.Diffusion(1000, 1e-4, 0.02)
    assert ddpm.ddim_timesteps(1000, 50) == list(range(1, 1000, 20))
    assert ddpm.ddim_timesteps(1000, 1000) == list(range(1, 1001))
    taus = ddpm.ddim_timesteps(1000, 300)
    assert len(taus) == len(set(taus)) == 300 and taus[-1] > 995
    model = Toy()
    x_T = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    a = ddpm.sample(model, diffusion, 8, (1, 4, 4), "ddim", steps=20, generator=torch.Generator().manual_seed(1))
    b = ddpm.sample(model, diffusion, 8, (1, 4, 4), "ddim", steps=20, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, x_T)
    # eq. 12 with eta = 0, step by step: x_{t'} = sqrt(ab') x0_hat + sqrt(1 - ab') eps_hat, x0_hat clipped, eps_hat
    # re-derived from it; ab' = 1 at the last step
    x, ab = x_T, diffusion.alpha_bar.tolist()
    for t, t_prev in zip(range(951, 0, -50), [*range(901, 0, -50), 0]):   # 20 steps: 1, 51, ..., 951
        eps = model(x, torch.full((8,), t)).float()
        x0 = ((x - math.sqrt(1 - ab[t]) * eps) / math.sqrt(ab[t])).clamp(-1, 1)
        eps = (x - math.sqrt(ab[t]) * x0) / math.sqrt(1 - ab[t])
        x = math.sqrt(ab[t_prev]) * x0 + math.sqrt(1 - ab[t_prev]) * eps
    torch.testing.assert_close(a, x, rtol=1e-5, atol=1e-5)
    with pytest.raises(common.UserError, match="--sample-steps 2000"):
        ddpm.ddim_timesteps(1000, 2000)


def test_train_step_draws_t_in_1_to_T_and_flips_horizontally():
    """t ~ Uniform{1..T} (the paper's t, never 0), and --hflip mirrors about half the images left to right."""
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, y=None):
            self.seen.append((x, t))
            return self.w * x

    diffusion, model = ddpm.Diffusion(4, 1e-4, 0.02), Recorder()
    cfg = ddpm.Config(T=4, hflip=True, warmup=0)
    x0 = torch.arange(16.0).view(1, 1, 4, 4).expand(4000, 1, 4, 4) / 15 * 2 - 1   # left-right asymmetric
    model.seen = []
    torch.manual_seed(0)
    ddpm.train_step(model, ddpm.EMA(model, 0.9), torch.optim.SGD(model.parameters(), lr=0.0), diffusion, x0, 0, cfg)
    x_t, t = model.seen[0]
    assert t.min() == 1 and t.max() == 4 and t.bincount().tolist()[1:] == pytest.approx([1000] * 4, rel=0.1)
    torch.manual_seed(0)   # the same draws: which images flipped, then t and eps, as train_step makes them
    flip = torch.rand(4000) < 0.5
    t2, eps = torch.randint(1, 5, (4000,)), torch.randn(4000, 1, 4, 4)
    expected = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
    assert torch.equal(t, t2) and 0.45 < flip.float().mean() < 0.55
    torch.testing.assert_close(x_t, diffusion.q_sample(expected, t, eps))


def test_attention_q_k_v_are_initialized_as_three_official_layers():
    """Each of q, k, v: Xavier uniform of a C x C layer (std 1/sqrt(C)), not of one C x 3C layer (std 1/sqrt(2C))."""
    torch.manual_seed(0)
    att = ddpm.Attention(128)
    for third in att.qkv.weight.detach().split(128):
        assert third.abs().max() <= math.sqrt(6 / 256) and third.std().item() == pytest.approx(128 ** -0.5, rel=0.03)
    assert not att.qkv.bias.any() and not att.out.weight.abs().max() > 1e-4


def test_attention_is_softmax_qk_v():
    torch.manual_seed(0)
    att = ddpm.Attention(32)
    nn.init.normal_(att.out.weight)
    x = torch.randn(2, 32, 3, 3)
    q, k, v = att.qkv(att.norm(x)).flatten(2).chunk(3, dim=1)               # B x C x HW each
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(32), dim=-1)        # B x HW x HW
    h = (w @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 32, 3, 3)
    torch.testing.assert_close(att(x), x + att.out(h), rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_the_official_one():
    e = ddpm.timestep_embedding(torch.tensor([0, 7]), 8)
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 3)
    torch.testing.assert_close(e[1], torch.cat([torch.sin(7 * freqs), torch.cos(7 * freqs)]))
    assert torch.equal(e[0], torch.tensor([0.0] * 4 + [1.0] * 4))


# ----------------------------------------------------------------------------------------------
# The shared contract
# ----------------------------------------------------------------------------------------------
def test_smoke(tmp):
    check_smoke("ddpm", SMALL, tmp)


def test_exact_resume_with_ema(tmp):
    check_exact_resume("ddpm", [*SMALL, "--hflip"], tmp)


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("ddpm", SMALL, tmp, signal.SIGTERM)


def test_sample(tmp):
    check_sample("ddpm", SMALL, tmp)


def test_bad_inputs(tmp):
    check_bad_inputs("ddpm", SMALL, "dcgan", DCGAN_SMALL, tmp)


def test_bad_flags(tmp):
    check_bad_flags("ddpm", SMALL, tmp, [
        (["--arch", "huge"], ["--arch"]), (["--T", 1], ["--T 1"]),
        (["--arch", "small", "--image-size", 30], ["--image-size 30", "multiple of 4"]),
        (["--sampler", "ddim", "--sample-steps", 20], ["--sample-steps 20", "at most"]),
        (["--vlb", 3, "--sample", 2], ["two commands"]), (["--ema-decay", 1.5], ["--ema-decay"]),
        (["--ema-decay", 1], ["--ema-decay 1", "below 1"]), (["--grad-clip", 0], ["--grad-clip 0", "above 0"]),
        (["--beta-1", 0], ["--beta-1 0.0", "0 < beta_1 <= beta_T"]), (["--beta-1", 0.1], ["--beta-1 0.1"]),
        (["--eval-vlb", 10], ["--eval-vlb N goes with --eval-every"]), (["--eta", 1.5], ["--eta"])])


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    check_ddp("ddpm", SMALL, tmp)


def test_amp_and_channels_last_resume_exactly(tmp):
    check_exact_resume("ddpm", [*SMALL, "--amp", "--channels-last"], tmp)


def test_compile_smoke_and_its_checkpoint_loads_plain(tmp):
    check_compile("ddpm", SMALL, tmp, "model")


def test_load_from_python(tmp):
    run_script("ddpm", *SMALL, "--steps", 2, "--out", tmp / "run", cwd=tmp)
    model, diffusion = ddpm.load(tmp / "run" / "ckpt.pt")
    saved = load(tmp / "run" / "ckpt.pt")["models"]["ema"]
    assert not model.training and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    images = ddpm.sample(model, diffusion, 2, (1, 8, 8), "ddim", steps=5)
    assert images.shape == (2, 1, 8, 8) and images.abs().max() <= 1


def test_vlb_command_and_eval_every(tmp):
    """--vlb N prints the bound on N test images; --eval-every with --eval-vlb logs it as test_bpd."""
    out = tmp / "bound"
    run_script("ddpm", *SMALL, "--steps", 4, "--eval-every", 2, "--eval-vlb", 3, "--eval-features", "inception",
               "--out", out, cwd=tmp, env={"TORCH_HOME": str(tmp / "no-weights")})
    import csv
    with open(out / "metrics.csv", newline="") as f:
        bpd = [float(r["test_bpd"]) for r in csv.DictReader(f) if r.get("test_bpd")]
    assert len(bpd) == 2 and all(0 < b < 50 for b in bpd)
    proc = run_script("ddpm", "--out", out, "--vlb", 3, cwd=tmp)
    value = float(proc.stdout.split("test_bpd: ")[1].split()[0])
    assert value == pytest.approx(bpd[-1], rel=1e-5)   # the same EMA weights and noise as at step 4


def test_sigterm_during_eval_vlb_skips_it_and_checkpoints(tmp):
    """A stop request in the middle of --eval-vlb (T = 1000 terms per image: seconds) ends the evaluation
    without a figure and the run with its checkpoint, as any stop does."""
    out = tmp / "stopped-eval"
    proc = start_script("ddpm", *SMALL, "--T", 1000, "--steps", 100, "--log-every", 1, "--eval-every", 2,
                        "--eval-vlb", 64, "--eval-metrics", "fid", "--eval-features", "inception", "--out", out,
                        cwd=tmp,
                        env={"TORCH_HOME": str(tmp / "no-weights"), "XDG_CACHE_HOME": str(tmp / "cache")})
    line = proc.stdout.readline()
    while line and "evaluation off for this run" not in line:   # FID: no Inception weights; L_vlb comes next
        line = proc.stdout.readline()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "checkpoint saved at step 2 (SIGTERM)" in stdout, stdout + stderr
    assert "test_bpd" not in (out / "metrics.csv").read_text() and load(out / "ckpt.pt")["step"] == 2


def sample_proc(out, dest, *args, env=None):
    return start_script("ddpm", "--out", out, "--sample", 1200, "--sample-out", dest, "--sampler", "ddim",
                        "--sample-steps", 2, *args, cwd=out.parent, env=env)


def test_sample_split_among_array_tasks_and_resumed(tmp):
    """Image i is the same whatever the split: two SLURM array tasks (or torchrun ranks) write the same
    PNGs as one process; a task stopped by SIGTERM mid-way exits 0 and the same command finishes the job
    without redrawing what is there; the .npz of one process holds the same images."""
    from PIL import Image
    out = tmp / "run"
    run_script("ddpm", *SMALL, "--steps", 2, "--out", out, cwd=tmp)
    one = sample_proc(out, tmp / "one")
    assert one.communicate(timeout=300)[0] and one.returncode == 0
    # two array tasks; the first is stopped after its first batch
    env = lambda task: {"SLURM_ARRAY_TASK_ID": str(task + 3), "SLURM_ARRAY_TASK_MIN": "3",   # noqa: E731
                        "SLURM_ARRAY_TASK_COUNT": "2"}
    first = sample_proc(out, tmp / "split", env=env(0))
    line = first.stdout.readline()
    while line and "images to draw" not in line:   # the first batch has begun: the signal stops after it
        line = first.stdout.readline()
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0 and "the same command continues" in stdout, stdout + stderr
    second = sample_proc(out, tmp / "split", env=env(1))
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0 and "the other shards write the rest" in stdout, stdout + stderr
    again = sample_proc(out, tmp / "split", env=env(0))
    stdout, stderr = again.communicate(timeout=300)
    assert again.returncode == 0 and "200 images to draw, 500 already in" in stdout, stdout + stderr
    names = sorted(p.name for p in (tmp / "one").glob("*.png"))
    assert len(names) == 1200 and names == sorted(p.name for p in (tmp / "split").glob("*.png"))
    assert not list((tmp / "split").glob("*.part"))
    for name in names[::97] + [names[-1]]:
        assert np.array_equal(np.asarray(Image.open(tmp / "one" / name)), np.asarray(Image.open(tmp / "split" / name)))
    npz = sample_proc(out, tmp / "all.npz")
    npz.communicate(timeout=300)
    assert npz.returncode == 0
    images = np.load(tmp / "all.npz")["images"]
    assert images.shape == (1200, 8, 8, 1)
    assert np.array_equal(images[1100, :, :, 0], np.asarray(Image.open(tmp / "one" / "001100.png")))
    # another sampler setting is another set of images: the folder is replaced, not mixed
    other = sample_proc(out, tmp / "split", "--seed", 1, env=env(1))
    stdout, _ = other.communicate(timeout=300)
    assert "500 images to draw" in stdout and len(list((tmp / "split").glob("*.png"))) == 500
    # torchrun's rank 1 of 2 takes the same share as array task 1 of 2: batch 1
    rank = sample_proc(out, tmp / "ranks", env={"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"})
    stdout, stderr = rank.communicate(timeout=300)
    assert rank.returncode == 0 and "(shard 2 of 2): 500 images to draw" in stdout, stdout + stderr
    assert sorted(p.name for p in (tmp / "ranks").glob("*.png")) == names[500:1000]
    # a .npz cannot be split
    proc = run_script("ddpm", "--out", out, "--sample", 4, "--sample-out", tmp / "x.npz", cwd=tmp, check=False,
                      env=env(0))
    assert_clean_error(proc, "a .npz is written by one process")


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def test_amp_may_change_on_resume_fp16_included(tmp):
    """A requeue onto another GPU type changes what --amp means; the fp16 GradScaler starts afresh."""
    check_amp_change_on_resume("ddpm", SMALL, tmp)


# ----------------------------------------------------------------------------------------------
# --classes: classifier-free guidance (Ho & Salimans 2022)
# ----------------------------------------------------------------------------------------------
def cfg_model() -> nn.Module:
    torch.manual_seed(0)
    model = ddpm.UNet(1, 32, (1, 2), 1, (1,), 0.0, classes=4).eval()
    with torch.no_grad():   # the zero-initialised output layer would make every eps 0: give it weights
        nn.init.normal_(model.tail[-1].weight, std=0.1)
    return model


def test_guidance_is_one_plus_w_conditional_minus_w_unconditional_in_one_batch():
    """eps~ = (1 + w) eps(z, c) - w eps(z) (the paper's convention), its two passes batched as one of 2B: the same
    as two separate passes; w = 0 is the conditional pass alone; no class means the null class."""
    model, x, t, y = cfg_model(), torch.randn(3, 1, 8, 8), torch.tensor([1, 5, 9]), torch.tensor([0, 2, 3])
    with torch.no_grad():
        conditional, unconditional = model(x, t, y), model(x, t, torch.full_like(y, 4))
        assert torch.equal(model(x, t), unconditional) and not torch.allclose(conditional, unconditional)
        assert torch.equal(ddpm.guided(model, y, 0.0)(x, t), conditional)
        torch.testing.assert_close(ddpm.guided(model, y, 2.0)(x, t), 3 * conditional - 2 * unconditional)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_both_samplers_are_guided(sampler):
    """Ancestral sampling and DDIM both step with the guided eps: the same images as a sampler handed the guided
    eps by hand, and other images than w = 0's."""
    model, diffusion, y = cfg_model(), ddpm.Diffusion(10, 1e-3, 0.2), torch.tensor([0, 1, 2, 3])
    by_hand = lambda x, t: 3 * model(x, t, y) - 2 * model(x, t, torch.full_like(y, 4))   # noqa: E731
    draw = lambda m, **kw: ddpm.sample(m, diffusion, 4, (1, 8, 8), sampler, 5, 0.5, torch.Generator().manual_seed(1),
                                       device="cpu", **kw)   # noqa: E731
    guided = draw(model, y=y, w=2.0)
    torch.testing.assert_close(guided, draw(by_hand))
    assert not torch.allclose(guided, draw(model, y=y, w=0.0))


@pytest.mark.parametrize("drop, null", [(1.0, True), (0.0, False)])
def test_cond_drop_replaces_the_class_by_the_null_one(drop, null):
    """--cond-drop 1 trains the unconditional model alone (every class the null one); 0, the conditional one."""
    model, seen = cfg_model().train(), []
    model.class_emb.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    cfg = ddpm.Config(T=10, cond_drop=drop)
    y = torch.tensor([0, 1, 2, 3])
    ddpm.train_step(model, ddpm.EMA(model, 0.9), torch.optim.SGD(model.parameters(), lr=0.0),
                    ddpm.Diffusion(10, 1e-3, 0.2), torch.rand(4, 1, 8, 8) * 2 - 1, 0, cfg, y=y)
    assert torch.equal(seen[0], torch.full_like(y, 4) if null else y)


def test_classes_sample_writes_each_class_alike_with_its_labels(tmp):
    check_conditional_sample("ddpm", [*SMALL, "--classes"], tmp)


def test_guided_samples_of_class_c_are_classified_c(tmp):
    """After 300 steps on the 8 x 8 synthetic data, w = 3 gives samples an independent classifier calls by their
    class (0.985 measured; 0.655 at w = 0; chance 0.25)."""
    check_samples_are_of_their_class(
        "ddpm", ["--dataset", "synthetic", "--arch", "tiny", "--T", 50, "--beta-schedule", "scaled", "--batch-size", 32,
                 "--device", "cpu", "--classes", "--warmup", 20, "--lr", 1e-3, "--ema-decay", 0.95, "--sampler", "ddim",
                 "--sample-steps", 10], tmp, steps=300, at_least=0.9, size=8, sample_flags=("--guidance", 3))


def test_classes_resume_exactly(tmp):
    check_exact_resume("ddpm", [*SMALL, "--classes"], tmp)
