"""wgan_gp.py: the gradient penalty against closed forms, Algorithm 1 (n_critic, Adam), the official networks'
parameter counts, the compile path (double backward) and the CLI contract."""
import copy
import signal

import pytest
import torch
import torch.nn as nn

import common
import wgan_gp
from conftest import (check_amp_change_on_resume, check_bad_flags, check_bad_inputs, check_compile, check_ddp,
                      check_exact_resume, check_sample, check_signal_resume, check_smoke, load)

SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4, "--device", "cpu",
         "--n-critic", 2]
WGAN_SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4,
              "--device", "cpu", "--n-critic", 1, "--no-critic-burst"]


def test_defaults_are_the_papers():
    cfg = wgan_gp.Config()
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.lambda_gp, cfg.n_critic, cfg.batch_size) == (1e-4, 0.0, 0.9, 10.0, 5, 64)
    assert (cfg.arch, cfg.critic_norm, cfg.leak, cfg.init_std) == ("dcgan", "none", 0.2, 0.02)
    dcgan, resnet = wgan_gp.resolve(wgan_gp.Config()), wgan_gp.resolve(wgan_gp.Config(arch="resnet"))
    assert (dcgan.image_size, dcgan.nz, dcgan.ngf, dcgan.ndf) == (64, 100, 64, 64)
    assert (resnet.image_size, resnet.nz, resnet.ngf, resnet.ndf) == (32, 128, 128, 128)
    assert wgan_gp.resolve(wgan_gp.Config(arch="resnet", nz=7)).nz == 7


def test_parameter_counts_match_the_official_code():
    """dcgan: the WGAN authors' DCGAN_G and DCGAN_D_nobn (64 x 64 x 3, ngf = ndf = 64); resnet: gan_cifar_resnet.py,
    unconditional (DIM_G = DIM_D = 128, z of 128), counted from its layers."""
    count = common.count_parameters
    assert count(wgan_gp.Generator(100, 64, 3, 64)) == 3_576_704
    assert count(wgan_gp.Critic(64, 3, 64, 0.2)) == 2_763_776
    assert count(wgan_gp.ResNetGenerator(128, 128, 3)) == 1_204_483
    assert count(wgan_gp.ResNetCritic(128, 3)) == 1_053_825


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_no_batch_norm_in_the_critic(norm):
    for critic in (wgan_gp.Critic(8, 3, 32, 0.2, norm), wgan_gp.ResNetCritic(8, 3, norm)):
        kinds = {type(m) for m in critic.modules()}
        assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
        assert (nn.GroupNorm in kinds) == (norm == "layer")
        x = torch.randn(4, 3, 32, 32)
        alone = torch.cat([critic(x[i:i + 1]) for i in range(4)])
        assert torch.allclose(critic(x), alone, atol=1e-5), "each sample's D(x) must not depend on the batch"


def test_layer_norm_is_the_official_one():
    """tflib's Layernorm over axes [1, 2, 3]: each sample normalised over C x H x W, a scale and shift per channel."""
    ln = wgan_gp.layer_norm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.uniform_(-1, 1)
    x = torch.randn(3, 6, 5, 5) * 3 + 1
    mean, var = x.mean(dim=(1, 2, 3), keepdim=True), x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * ln.weight.view(1, 6, 1, 1) + ln.bias.view(1, 6, 1, 1)
    assert torch.allclose(ln(x), expected, atol=1e-5)


def test_resnet_shapes_and_its_upsampling_is_nearest_neighbour():
    G, critic = wgan_gp.ResNetGenerator(16, 8, 3), wgan_gp.ResNetCritic(8, 3)
    x = G(torch.randn(5, 16))
    assert x.shape == (5, 3, 32, 32) and critic(x).shape == (5,)
    t = torch.arange(4.0).view(1, 1, 2, 2)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3.]]).view(1, 1, 4, 4)
    assert torch.equal(wgan_gp.up(t), expected)
    assert torch.equal(wgan_gp.down(wgan_gp.up(t)), t)


def test_penalty_of_a_linear_critic_is_its_closed_form_and_reaches_its_weights():
    """D(x) = w.x has grad_x D = w everywhere: the penalty is (||w|| - 1)^2 for every sample, and its gradient
    in w is 2 (||w|| - 1) w / ||w||, which only a double backward (create_graph) delivers."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Flatten(), nn.Linear(48, 1, bias=False))
    w = critic[1].weight
    x_hat = wgan_gp.interpolate(torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)).requires_grad_(True)
    penalty = wgan_gp.gradient_penalty(critic(x_hat).flatten(), x_hat)
    norm = w.detach().norm()
    assert torch.allclose(penalty, (norm - 1).expand(5) ** 2, atol=1e-6)
    penalty.mean().backward()
    assert torch.allclose(w.grad, 2 * (norm - 1) * w.detach() / norm, atol=1e-6)


def test_penalty_is_per_sample():
    """D(x) = ||x||^2 / 2 has grad_x D = x: sample i's penalty is (||x^_i|| - 1)^2, not a norm over the batch."""
    x_hat = torch.randn(6, 2, 3, 3).requires_grad_(True)
    d_hat = 0.5 * x_hat.pow(2).flatten(1).sum(1)
    penalty = wgan_gp.gradient_penalty(d_hat, x_hat)
    assert torch.allclose(penalty, (x_hat.detach().flatten(1).norm(dim=1) - 1) ** 2, atol=1e-6)


def test_interpolation_has_one_eps_per_sample_in_0_1():
    torch.manual_seed(1)
    x, fake = torch.randn(64, 3, 4, 4), torch.randn(64, 3, 4, 4)
    eps = ((wgan_gp.interpolate(x, fake) - fake) / (x - fake)).flatten(1)    # x^ - x~ = eps (x - x~)
    assert torch.allclose(eps, eps[:, :1].expand_as(eps), atol=1e-4), "one eps for all of a sample's pixels"
    assert eps.min() >= 0 and eps.max() <= 1 and eps[:, 0].std() > 0.2, "eps ~ U[0, 1], a different one per sample"


def test_penalty_in_bf16_is_computed_in_float32():
    """A bf16 critic gives the float32 penalty to bf16 precision, computed in float32."""
    torch.manual_seed(2)
    critic = wgan_gp.Critic(8, 1, 16, 0.2)
    x_hat = torch.randn(4, 1, 16, 16).requires_grad_(True)
    plain = wgan_gp.gradient_penalty(critic(x_hat), x_hat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d_hat = critic(x_hat)
    bf16 = wgan_gp.gradient_penalty(d_hat.float(), x_hat)
    assert bf16.dtype == torch.float32 and torch.allclose(bf16, plain, rtol=0.05)


def test_fp16_with_its_grad_scaler_gives_a_finite_penalty_and_steps():
    """fp16 with a GradScaler at its initial scale, 2^16: the step's penalty is the float32 one (D(x^) runs in
    float32; a scaled inner backward in fp16 overflowed to NaN) and no step is skipped (the scale stays)."""
    penalties = []
    for amp in (None, torch.float16):
        cfg, G, critic, opt_G, opt_critic = tiny()
        scaler = torch.amp.GradScaler("cpu", enabled=amp is not None)
        torch.manual_seed(4)
        losses = wgan_gp.train_step(G, critic, opt_G, opt_critic, Stream(torch.rand(8, 1, 16, 16) * 2 - 1), 1, cfg,
                                    amp, scaler)
        penalties.append(losses["gradient_penalty"])
    assert torch.isfinite(penalties[1]) and torch.allclose(penalties[1], penalties[0], rtol=1e-3)
    assert scaler.get_scale() == 2.0 ** 16


class Quadratic(nn.Module):
    """D(x) = w.x + c ||x||^2 / 2, whose gradient w + c x depends on where x^ lies."""

    def __init__(self, dim):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.linspace(-0.6, 0.9, dim)), nn.Parameter(torch.tensor(0.7))

    def forward(self, x):
        x = x.flatten(1)
        return x @ self.w + 0.5 * self.c * x.pow(2).sum(1)


def test_a_critic_step_and_a_generator_step_against_their_closed_forms():
    """With SGD at lr 1 each step is minus the gradient: the critic's of D(x~) - D(x) + lambda (||w + c x^|| - 1)^2
    (averaged, x^ = eps x + (1 - eps) x~ with the step's own eps), then G's of -D(G(z)) with the updated critic."""
    cfg = wgan_gp.Config(nz=3)
    torch.manual_seed(0)
    G, critic = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (1, 2, 2))), Quadratic(4)
    x = torch.randn(5, 1, 2, 2)
    w, c = (p.detach().clone().requires_grad_(True) for p in (critic.w, critic.c))
    G_before = [p.detach().clone() for p in G.parameters()]
    torch.manual_seed(5)   # what train_step draws, in its order: z, eps, then the generator step's z
    z, eps, z_G = torch.randn(5, 3), torch.rand(5, 1, 1, 1), torch.randn(5, 3)
    D = lambda t: t.flatten(1) @ w + 0.5 * c * t.flatten(1).pow(2).sum(1)   # noqa: E731
    fake = G(z).detach()
    x_hat = (eps * x + (1 - eps) * fake).flatten(1)
    penalty = ((w + c * x_hat).norm(dim=1) - 1) ** 2
    loss = D(fake).mean() - D(x).mean() + cfg.lambda_gp * penalty.mean()
    grad_w, grad_c = torch.autograd.grad(loss, [w, c])
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=1.0)   # noqa: E731

    class Fixed:
        def next(self):
            return x

    torch.manual_seed(5)
    losses = wgan_gp.train_step(G, critic, sgd(G), sgd(critic), Fixed(), 1, cfg)
    assert losses["gradient_penalty"].item() == pytest.approx(penalty.mean().item(), rel=1e-5)
    assert losses["W_estimate"].item() == pytest.approx((D(x).mean() - D(fake).mean()).item(), rel=1e-5)
    assert torch.allclose(critic.w, w - grad_w, atol=1e-6) and torch.allclose(critic.c, c - grad_c, atol=1e-6)
    G_old = nn.Sequential(nn.Linear(3, 4), nn.Unflatten(1, (1, 2, 2)))
    for p, q in zip(G_old.parameters(), G_before):
        p.data.copy_(q)
    grads_G = torch.autograd.grad(-critic(G_old(z_G)).mean(), list(G_old.parameters()))
    for p, q, g in zip(G.parameters(), G_before, grads_G):
        assert torch.allclose(p, q - g, atol=1e-6)


class Stream:
    """A data stream that counts the batches drawn."""

    def __init__(self, batch):
        self.batch, self.drawn = batch, 0

    def next(self):
        self.drawn += 1
        return self.batch + 0.01 * self.drawn


def tiny(norm="none", optimizer=lambda params: torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.9))):
    cfg = wgan_gp.resolve(wgan_gp.Config(dataset="synthetic", image_size=16, batch_size=8, ngf=4, ndf=4,
                                         critic_norm=norm))
    torch.manual_seed(0)
    G, critic = wgan_gp.build(cfg, "cpu")
    return cfg, G, critic, optimizer(G.parameters()), optimizer(critic.parameters())


def test_n_critic_adam_steps_each_on_its_own_batch_then_one_generator_step():
    cfg, G, critic, opt_G, opt_critic = tiny()
    steps = {"G": 0, "critic": 0}
    opt_G.register_step_post_hook(lambda *_: steps.__setitem__("G", steps["G"] + 1))
    opt_critic.register_step_post_hook(lambda *_: steps.__setitem__("critic", steps["critic"] + 1))
    data = Stream(torch.rand(8, 1, 16, 16) * 2 - 1)
    losses = wgan_gp.train_step(G, critic, opt_G, opt_critic, data, 5, cfg)
    assert steps == {"G": 1, "critic": 5} and data.drawn == 5
    assert set(losses) == {"W_estimate", "gradient_penalty", "loss_G"}


@pytest.mark.parametrize("norm", ["none", "layer"])
def test_one_call_on_real_and_fake_gives_the_critic_update_of_separate_calls(norm):
    """train_step's D(cat(x, x~)) then D(x^) equals D(x), D(x~), D(x^) in three calls: the same critic update
    (SGD, lr 1, so the weights show the gradients), since the critic has no batch statistics."""
    batch = torch.rand(8, 1, 16, 16) * 2 - 1
    x = batch + 0.01   # Stream's first batch
    cfg, G, critic, opt_G, opt_critic = tiny(norm, lambda params: torch.optim.SGD(params, lr=1.0))
    reference, G_before = copy.deepcopy(critic), copy.deepcopy(G)
    torch.manual_seed(3)
    wgan_gp.train_step(G, critic, opt_G, opt_critic, Stream(batch), 1, cfg)
    torch.manual_seed(3)   # train_step's draws, in its order: z, then eps
    with torch.no_grad():
        fake = G_before(wgan_gp.sample_z(8, cfg.nz, "cpu"))
    x_hat = wgan_gp.interpolate(x, fake).requires_grad_(True)
    penalty = wgan_gp.gradient_penalty(reference(x_hat), x_hat)
    loss = reference(fake).mean() - reference(x).mean() + cfg.lambda_gp * penalty.mean()
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    for p, q, g in zip(critic.parameters(), reference.parameters(), grads):
        assert (p - (q - g)).norm() <= 1e-5 * (q - g).norm() + 1e-7


def test_resnet_trains_a_step():
    cfg = wgan_gp.resolve(wgan_gp.Config(dataset="synthetic-rgb", arch="resnet", batch_size=4, nz=8, ngf=8, ndf=8))
    torch.manual_seed(0)
    G, critic = wgan_gp.build(cfg, "cpu")
    opt_G, opt_critic = (torch.optim.Adam(m.parameters(), lr=1e-4, betas=(0.0, 0.9)) for m in (G, critic))
    before = {name: p.detach().clone() for name, p in critic.named_parameters()}
    losses = wgan_gp.train_step(G, critic, opt_G, opt_critic, Stream(torch.rand(4, 3, 32, 32) * 2 - 1), 1, cfg)
    assert all(torch.isfinite(v) for v in losses.values())
    # every weight moves but the output's bias, whose gradient is exactly 0: it cancels in D(x~) - D(x) and
    # does not reach grad_x^ D
    assert [name for name, p in critic.named_parameters() if torch.equal(p, before[name])] == ["output.bias"]


def test_smoke_and_the_optimizer_is_the_papers(tmp):
    check_smoke("wgan_gp", SMALL, tmp)
    ckpt = load(tmp / "smoke" / "ckpt.pt")
    for name in ("G", "critic"):
        opt = ckpt["optimizers"][name]
        group = opt["param_groups"][0]
        assert {k: group[k] for k in ("lr", "betas", "eps", "weight_decay", "amsgrad")} \
            == {"lr": 1e-4, "betas": (0.0, 0.9), "eps": 1e-8, "weight_decay": 0, "amsgrad": False}
        assert set(opt["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}, "Adam"
    with open(tmp / "smoke" / "metrics.csv") as f:
        assert f.readline().strip() == "step,time_s,images_per_s,W_estimate,gradient_penalty,loss_G"
    G = wgan_gp.load(tmp / "smoke" / "ckpt.pt")
    assert not G.training and G(wgan_gp.sample_z(2, G.nz, "cpu")).shape == (2, 1, 16, 16)


def test_exact_resume(tmp):
    check_exact_resume("wgan_gp", [*SMALL, "--n-critic", 1], tmp)   # 1 batch a step: the check's epoch arithmetic


def test_amp_layer_norm_and_channels_last_resume_exactly(tmp):
    """bf16 autocast through the double backward, in NHWC layout, with layer norm: the same exactness."""
    check_exact_resume("wgan_gp", [*SMALL, "--n-critic", 1, "--amp", "--channels-last", "--critic-norm", "layer"], tmp)


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("wgan_gp", SMALL, tmp, signal.SIGTERM)


def test_sample(tmp):
    check_sample("wgan_gp", SMALL, tmp)


def test_bad_inputs(tmp):
    check_bad_inputs("wgan_gp", SMALL, "wgan", WGAN_SMALL, tmp)


def test_bad_flags(tmp):
    check_bad_flags("wgan_gp", SMALL, tmp, [
        (["--arch", "resnet", "--image-size", 28], ["--arch resnet", "--image-size 28"]),
        (["--arch", "vgg"], ["--arch", "vgg"]), (["--critic-norm", "batch"], ["--critic-norm"]),
        (["--beta2", 1], ["--beta2"]), (["--lambda-gp", -1], ["--lambda-gp -1"])])


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    """DDP with the penalty's double backward: gradients through autograd.grad(create_graph=True) are averaged."""
    check_ddp("wgan_gp", SMALL, tmp)


def test_compile_compiles_g_only_and_trains_through_the_double_backward(tmp):
    """A compiled critic would fail ("torch.compile with aot_autograd does not currently support double
    backward"): --compile (with --amp) trains, and its checkpoint loads in a plain --sample."""
    check_compile("wgan_gp", SMALL, tmp, "G")


def test_amp_may_change_on_resume_fp16_included(tmp):
    """A requeue onto another GPU type changes what --amp means; the fp16 GradScaler starts afresh."""
    check_amp_change_on_resume("wgan_gp", SMALL, tmp)
