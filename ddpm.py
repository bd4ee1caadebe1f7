"""Denoising Diffusion Probabilistic Models.

Jonathan Ho, Ajay Jain, Pieter Abbeel. NeurIPS 2020. arXiv:2006.11239

Forward process (eq. 2, 4), a fixed Markov chain that adds Gaussian noise with variances beta_1..beta_T:

    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_t = 1 - beta_t,
                       alpha_bar_t = prod_{s <= t} alpha_s
Its posterior (eq. 6, 7), tractable given x_0:

    q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I),
    mu_tilde_t   = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t) x_0
                   + sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) x_t
    beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t
The reverse process p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2 I) has the posterior's form, with x_0
predicted from a noise estimate eps_theta (eq. 11): x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t).

Algorithm 1 (training), the simplified objective L_simple (eq. 14):
    x_0 ~ data, t ~ Uniform{1..T}, eps ~ N(0, I)
    gradient step on || eps - eps_theta(sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps, t) ||^2
Algorithm 2 (sampling): x_T ~ N(0, I); for t = T..1: z ~ N(0, I) if t > 1 else 0,
    x_{t-1} = mu_theta(x_t, t) + sigma_t z,   sigma_t^2 = beta_t (default) or beta_tilde_t (--var beta-tilde)
The variational bound (eq. 5) L_vlb = L_T + sum_{t>1} L_{t-1} + L_0, reported in bits/dim on the test set:
    L_T = KL(q(x_T | x_0) || N(0, I)),   L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)),
    L_0 = -log p(x_0 | x_1), a Gaussian discretized to the 256 pixel values (eq. 13).
DDIM (Song, Meng, Ermon 2020, "Denoising Diffusion Implicit Models", arXiv:2010.02502, eq. 12), by flag:
the same network, S of the T steps, x_{t'} = sqrt(alpha_bar_t') x_0 + sqrt(1 - alpha_bar_t' - s^2) eps
+ s z with s = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t');
eta = 0 is deterministic; S = 50 takes 20x fewer network evaluations than Algorithm 2's T = 1000.

The paper's hyper-parameters (section 4, appendix B) are the defaults: T = 1000, beta linear from 1e-4 to 0.02
(computed in float64, as the official code); a U-Net (PixelCNN++ backbone) of ResNet blocks with GroupNorm (32
groups), the sinusoidal embedding of t added in every block, dropout 0.1; Adam lr 2e-4 with a linear warm-up
over 5,000 steps, gradients clipped at norm 1, an EMA of the weights with decay 0.9999 (samples and evaluation
use it), batch 128. Two parts of the paper's CIFAR-10 setup are flags: --arch cifar10 and --hflip (random
horizontal flips). --arch cifar10 is the paper's network (ch 128, ch_mult 1,2,2,2, 2 blocks per resolution,
self-attention at 16 x 16 and in the middle): 35,746,307 parameters, the official code's count (tested); at
other sizes its attention stays at the 16 x 16 level. --arch small (the default) is the same network a quarter
as wide and one resolution shorter (ch 32, ch_mult 1,2,2: 28 -> 14 -> 7), so that Fashion-MNIST trains on a
CPU: 1,623,169 parameters for one channel; its levels have no 16 x 16, so attention sits at level 1 (14 x 14),
as in --arch tiny. With 32 channels, GroupNorm's 32 groups are one channel each there: instance norm.

Deviations, each deliberate:
- x_0 predicted at sampling time is clipped to [-1, 1] before mu_theta is formed, as the official sampler
  does (the paper's Algorithm 2 is written without it); L_vlb is computed the same way (the official
  evaluation, clip_denoised=True). DDIM clips x_0 too and re-derives eps from the clipped x_0 (as OpenAI's
  guided-diffusion does): with eta = 1 and S = T it is then exactly Algorithm 2 with sigma^2 = beta_tilde
  (tested); the DDIM paper's code does not clip.
- sigma_1^2 is beta_tilde_2, under --var beta (the paper's CIFAR-10 choice) and --var beta-tilde alike, as in
  the official code: sigma_1 = sqrt(beta_1) = 0.010 is wider than a pixel bin (2/255 = 0.0078), sqrt(beta_tilde_2)
  = 0.0074 about one bin, so L_0 is better for the same samples (1.71 -> 1.31 bits/dim for a perfect mean).
- L_0's Gaussian mass per pixel bin uses the exact normal CDF (eq. 13); the official code uses the tanh
  approximation 0.5 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), off by up to 1.8e-4 in each CDF.
- The learning rate of update s (counted from 0) is 2e-4 min(s / 5000, 1), the official warm-up, so the
  first update has lr 0.
- The course notes give the hybrid objective L_simple + 0.001 L_vlb with learned variances: that is
  Nichol & Dhariwal 2021 (arXiv:2102.09672); this file is Ho et al., L_simple and fixed variances.
- The network is given the paper's t = 1..T; the official code feeds its 0-based index t - 1 to the
  embedding: the same model, trained from scratch, but official weights would need t - 1.
- Downsampling pads its stride-2 convolution symmetrically (PyTorch's padding=1), TensorFlow's SAME pads
  right and bottom only: the same parameters, a one-pixel shift of where the kernel lands.
- GroupNorm's eps is PyTorch's 1e-5; the official tf.contrib group_norm uses 1e-6.
- The paper's beta endpoints are for T = 1000: at another --T the chain stops short of N(0, I) (alpha_bar_T
  0.36 at T = 100), which the run prints and warns about; --beta-schedule scaled multiplies both by 1000 / T.
- DDIM's S steps start at t = 1 and end at tau_S = 1 + (S - 1) T / S (981 for S = 50), as the DDIM code's
  uniform skip: its x at tau_S is drawn from N(0, I) (alpha_bar 5.9e-5 there, 4.0e-5 at T).

Usage:
    python ddpm.py                                     # Fashion-MNIST 28 x 28, the small U-Net
    python ddpm.py --resume                            # continue runs/ddpm-fashion-mnist (a requeued job too)
    python ddpm.py --dataset cifar10 --arch cifar10 --hflip --steps 800000 --amp --compile --channels-last
    GPUS=4 sbatch submit.sh ddpm --dataset cifar10 --arch cifar10 --hflip   # or torchrun --nproc_per_node=4
    python ddpm.py --sample 50000 --sample-out samples/ --sampler ddim --sample-steps 50   # for fid.py
    torchrun --nproc_per_node=4 ddpm.py --sample 50000 --sample-out samples/   # split across 4 GPUs
    sbatch --array=0-9 submit.sh ddpm --sample 50000 --sample-out samples/     # or 10 SLURM array tasks
    python ddpm.py --vlb 10000                         # L_vlb in bits/dim on 10,000 test images
    python ddpm.py --eval-every 10000 --eval-vlb 1000 --sampler ddim   # FID and test bits/dim in training
--batch-size is the global batch, shared among the processes (each its own slice and noise). --sample into
a folder can be split and resumed: image i always comes from the same noise (batch i // 500, seeded by
--seed), so any split, and any restart, writes the same images; the images already there are kept.

From Python: model, diffusion = ddpm.load("runs/ddpm-fashion-mnist/ckpt.pt");
images = ddpm.sample(model, diffusion, 16, (1, 28, 28))   (the EMA weights, in [-1, 1])
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import arg

# name -> (ch, ch_mult, blocks per resolution); self-attention: attention_level
ARCHS = {"tiny": (32, (1, 2), 1),              # for the tests and a first look
         "small": (32, (1, 2, 2), 2),
         "cifar10": (128, (1, 2, 2, 2), 2)}   # the paper's CIFAR-10 U-Net


@dataclass
class Config(common.RunConfig):
    steps: int = arg(100_000, "optimizer steps (the paper: 800,000 for CIFAR-10)", run=True, min=0)
    sample_every: int = arg(5000, "write a sample grid (--sampler) every N steps", run=True, min=1)
    vlb: int = arg(0, "no training: L_vlb in bits/dim on the first N test images, with the checkpoint's EMA "
                   "weights", command=True, min=0)
    eval_vlb: int = arg(0, "with --eval-every: also L_vlb in bits/dim on the first N test images, to metrics.csv "
                        "(test_bpd)", run=True, min=0)
    # Sampling (grids, --eval-every, --sample): none of these changes the training
    sampler: str = arg("ddpm", "ddpm (Algorithm 2, T steps) | ddim (--sample-steps steps)", run=True,
                       choices=("ddpm", "ddim"))
    sample_steps: int = arg(50, "DDIM's S: steps of --sampler ddim", run=True, min=1)
    eta: float = arg(0.0, "DDIM's eta: 0 deterministic, 1 the ancestral sampler's noise", run=True, min=0, max=1)
    var: str = arg("beta", "sigma_t^2 of the reverse process: beta (the paper's CIFAR-10 choice) | beta-tilde",
                   run=True, choices=("beta", "beta-tilde"))
    # The paper's hyper-parameters (section 4, appendix B)
    image_size: int = arg(0, "0: the dataset's own (28 Fashion-MNIST, 32 CIFAR-10); a multiple of "
                          "2^(levels - 1)", min=0)
    arch: str = arg("small", "U-Net: small (CPU-sized, for 28 x 28) | cifar10 (the paper's, 35.7M parameters) | "
                    "tiny (tests)",
                    choices=tuple(ARCHS))
    dropout: float = arg(0.1, "dropout in the ResNet blocks (the paper: 0.1 on CIFAR-10)", min=0, max=0.99)
    attn_level: int = arg(-1, "the U-Net level with self-attention (level i works at image_size / 2^i); -1: the "
                          "arch's (cifar10: the 16 x 16 level, the paper's; small, tiny: level 1)", min=-1, predates=1)
    T: int = arg(1000, "diffusion steps", min=2)
    beta_1: float = arg(1e-4, "beta at t = 1 (linear schedule)", min=0, max=0.999)
    beta_T: float = arg(0.02, "beta at t = T", min=0, max=0.999)
    beta_schedule: str = arg("linear", "linear: from --beta-1 to --beta-T whatever T (the paper's, for T = 1000) | "
                             "scaled: both times 1000 / T (Nichol & Dhariwal 2021), so that a shorter chain still "
                             "ends near N(0, I)", choices=("linear", "scaled"))
    batch_size: int = arg(128, "minibatch size (global, shared among processes)", min=1)
    lr: float = arg(2e-4, "Adam learning rate", above=0)
    warmup: int = arg(5000, "steps of linear learning-rate warm-up", min=0)
    grad_clip: float = arg(1.0, "clip the gradient's global norm at this value", above=0)
    ema_decay: float = arg(0.9999, "decay of the EMA of the weights used for sampling", min=0, below=1)
    hflip: bool = arg(False, "random horizontal flips of the training images (the paper: on for CIFAR-10)")
    channels_last: bool = arg(False, "NHWC memory layout for the convolutions (faster with --amp)", run=True)


# ----------------------------------------------------------------------------------------------
# The diffusion: schedules, q, the posterior, the reverse step, the bound
# ----------------------------------------------------------------------------------------------
class Diffusion:
    """The fixed forward process and its closed forms. Arrays are indexed by the paper's t = 0..T: index 0
    is t = 0 (beta_0 = 0, alpha_bar_0 = 1), so alpha_bar[t - 1] reads as the paper writes it."""

    def __init__(self, T: int, beta_1: float, beta_T: float, var: str = "beta", device="cpu"):
        self.T = T
        beta = torch.cat([torch.zeros(1, dtype=torch.float64), torch.linspace(beta_1, beta_T, T, dtype=torch.float64)])
        alpha = 1 - beta
        alpha_bar = torch.cumprod(alpha, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        beta_tilde = torch.zeros_like(beta)
        beta_tilde[1:] = (1 - alpha_bar_prev[1:]) / (1 - alpha_bar[1:]) * beta[1:]    # eq. 7; beta_tilde_1 = 0
        sigma2 = (beta if var == "beta" else beta_tilde).clone()
        sigma2[1] = beta_tilde[2]   # sigma_1 only enters L_0 (no noise is added at t = 1): official code, above
        wide = torch.float32 if torch.device(device).type == "mps" else torch.float64   # MPS has no float64
        to = lambda v: v.to(device, wide)                                            # noqa: E731
        self.beta, self.alpha, self.alpha_bar, self.alpha_bar_prev = map(to, (beta, alpha, alpha_bar, alpha_bar_prev))
        self.beta_tilde, self.sigma2 = to(beta_tilde), to(sigma2)
        self.log_beta_tilde = to(beta_tilde.clamp(min=1e-300).log())   # at t = 1 (log 0): vlb_terms replaces it by L_0
        self.log_sigma2 = to(sigma2.clamp(min=1e-300).log())
        self.alpha_bar_list, self.beta_list = alpha_bar.tolist(), beta.tolist()   # scalars, without a device trip
        # mu_tilde = coef_x0 x_0 + coef_xt x_t (eq. 7)
        self.coef_x0 = to(alpha_bar_prev.sqrt() * beta / (1 - alpha_bar).clamp(min=1e-20))
        self.coef_xt = to(alpha.sqrt() * (1 - alpha_bar_prev) / (1 - alpha_bar).clamp(min=1e-20))

    @staticmethod
    def at(v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v[t] as float32, shaped to broadcast over N x C x H x W."""
        return v[t].float().view(-1, 1, 1, 1)

    def q_sample(self, x0, t, eps):
        """x_t ~ q(x_t | x_0) by reparameterization (eq. 4)."""
        return self.at(self.alpha_bar, t).sqrt() * x0 + (1 - self.at(self.alpha_bar, t)).sqrt() * eps

    def posterior(self, x0, xt, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0) (eq. 6, 7)."""
        return self.at(self.coef_x0, t) * x0 + self.at(self.coef_xt, t) * xt, self.at(self.beta_tilde, t)

    def predict_x0(self, xt, t, eps):
        """x_0 from x_t and a noise estimate, inverting eq. 4."""
        return (xt - (1 - self.at(self.alpha_bar, t)).sqrt() * eps) / self.at(self.alpha_bar, t).sqrt()

    def p_mean(self, model, xt, t):
        """mu_theta(x_t, t): the posterior mean at the predicted x_0, clipped to [-1, 1] (official sampler)."""
        x0 = self.predict_x0(xt, t, model(xt, t).float()).clamp(-1, 1)
        return self.posterior(x0, xt, t)[0], x0


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1)


def discretized_gaussian_log_likelihood(x, mean, log_scale):
    """log p(x) of eq. 13 for x in [-1, 1] on the 256-value grid: the Gaussian's mass over x's bin of width
    2/255, the first and last bins stretched to -inf and +inf."""
    std_normal = torch.distributions.Normal(0.0, 1.0)
    inv_std = torch.exp(-log_scale)
    cdf_plus = std_normal.cdf(inv_std * (x - mean + 1 / 255))
    cdf_min = std_normal.cdf(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_probs = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_probs))


@torch.no_grad()
def vlb_terms(model, diffusion: Diffusion, x0, t, generator=None):
    """L_{t-1} for each image at its own t (t > 1: a KL; t = 1: L_0 = -log p(x_0 | x_1)), in bits/dim."""
    eps = torch.randn(x0.shape, device=x0.device, generator=generator)
    xt = diffusion.q_sample(x0, t, eps)
    true_mean, _ = diffusion.posterior(x0, xt, t)
    true_logvar = diffusion.at(diffusion.log_beta_tilde, t)
    mean, _ = diffusion.p_mean(model, xt, t)
    logvar = diffusion.at(diffusion.log_sigma2, t)
    kl = normal_kl(true_mean, true_logvar, mean, logvar).flatten(1).mean(1)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar).flatten(1).mean(1)
    return torch.where(t == 1, nll, kl) / math.log(2)


def prior_bpd(diffusion: Diffusion, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits/dim: no parameter, close to 0 for T = 1000."""
    T = torch.full((len(x0),), diffusion.T, device=x0.device)
    mean = diffusion.at(diffusion.alpha_bar, T).sqrt() * x0
    logvar = (1 - diffusion.at(diffusion.alpha_bar, T)).log().expand_as(x0)
    return normal_kl(mean, logvar, torch.zeros_like(x0), torch.zeros_like(x0)).flatten(1).mean(1) / math.log(2)


@torch.no_grad()
def vlb_bpd(model, diffusion: Diffusion, images: torch.Tensor, batch: int = 100, seed: int = 0, should_stop=None,
            progress=None) -> float:
    """The bound L_vlb in bits/dim, averaged over ``images`` (uint8 N x C x H x W): every one of the T terms
    for every image (T network evaluations per image), as the paper's Table 1. None if ``should_stop()``."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    total, t0 = 0.0, time.time()
    for i in range(0, len(images), batch):
        x0 = images[i:i + batch].to(device).float() / 127.5 - 1
        bpd = prior_bpd(diffusion, x0)
        for t in range(diffusion.T, 0, -1):
            if should_stop is not None and should_stop():
                return None
            bpd = bpd + vlb_terms(model, diffusion, x0, torch.full((len(x0),), t, device=device), g)
        total += bpd.sum().item()
        if progress:
            progress(min(i + batch, len(images)), len(images), time.time() - t0)
    return total / len(images)


# ----------------------------------------------------------------------------------------------
# The network: the U-Net of the official code (diffusion_tf/models/unet.py)
# ----------------------------------------------------------------------------------------------
def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The Transformer's sinusoidal position embedding of t (official get_timestep_embedding): sin, then cos."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / (half - 1))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def init_(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """Official default_init: variance scaling, fan_avg, uniform (Xavier uniform with gain sqrt(scale));
    scale 0 stands for 1e-10 (the layers whose output starts at 0). Biases 0."""
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale or 1e-10))
    nn.init.zeros_(layer.bias)
    return layer


class ResBlock(nn.Module):
    """GroupNorm, swish, conv 3x3; + dense(swish(temb)); GroupNorm, swish, dropout, conv 3x3 (init 0);
    + the input (through a 1x1 convolution where the channels change)."""

    def __init__(self, cin: int, cout: int, tdim: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(32, cin), init_(nn.Conv2d(cin, cout, 3, padding=1))
        self.temb = init_(nn.Linear(tdim, cout))
        self.norm2, self.conv2 = nn.GroupNorm(32, cout), init_(nn.Conv2d(cout, cout, 3, padding=1), 0)
        self.dropout = nn.Dropout(dropout)
        self.skip = init_(nn.Conv2d(cin, cout, 1)) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H x W positions (official attn_block), output projection init 0."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.GroupNorm(32, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)          # the official q, k, v NIN layers, in one
        for third in self.qkv.weight.data.split(ch):  # each initialized as its own C x C layer (fan_out C, not 3C)
            nn.init.xavier_uniform_(third)
        nn.init.zeros_(self.qkv.bias)
        self.out = init_(nn.Conv2d(ch, ch, 1), 0)

    def forward(self, x, temb=None):
        B, C, H, W = x.shape
        # positions x channels, each row contiguous: what the fused attention kernels take (else a slower path)
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).contiguous()   # B x HW x 3C
        q, k, v = qkv.view(B, 1, H * W, 3 * C).chunk(3, dim=-1)                # B x 1 x HW x C each
        h = F.scaled_dot_product_attention(q, k, v)                              # softmax(q k^T / sqrt(C)) v
        return x + self.out(h.transpose(-1, -2).reshape(B, C, H, W))


class Down(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = init_(nn.Conv2d(ch, ch, 3, stride=2, padding=1))

    def forward(self, x):
        return self.conv(x)


class Up(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = init_(nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t). At --arch cifar10, 3 x 32 x 32 (ch 128):
        conv 128 @32 -> [2 ResBlocks 128] @32 -> down -> [2 ResBlocks 256 + attention] @16 -> down ->
        [2 x 256] @8 -> down -> [2 x 256] @4 -> middle: ResBlock, attention, ResBlock @4 -> the mirror
        image with 3 ResBlocks per resolution, each fed the concatenated skip -> GroupNorm, swish, conv 3
    """

    def __init__(self, channels: int, ch: int, ch_mult: tuple, num_res_blocks: int, attn: tuple, dropout: float):
        super().__init__()
        tdim = 4 * ch
        self.ch = ch
        self.temb = nn.Sequential(init_(nn.Linear(ch, tdim)), nn.SiLU(), init_(nn.Linear(tdim, tdim)))
        self.head = init_(nn.Conv2d(channels, ch, 3, padding=1))
        self.down, skips, now = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
                skips.append(now)
            if level != len(ch_mult) - 1:
                self.down.append(Down(now))
                skips.append(now)
        self.middle = nn.ModuleList([ResBlock(now, now, tdim, dropout), Attention(now),
                                     ResBlock(now, now, tdim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(skips.pop() + now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
            if level != 0:
                self.up.append(Up(now))
        self.tail = nn.Sequential(nn.GroupNorm(32, now), nn.SiLU(), init_(nn.Conv2d(now, channels, 3, padding=1), 0))

    @staticmethod
    def _block(cin, cout, tdim, dropout, attention: bool):
        return nn.ModuleList([ResBlock(cin, cout, tdim, dropout)] + ([Attention(cout)] if attention else []))

    def forward(self, x, t):
        temb = self.temb(timestep_embedding(t, self.ch))
        h = self.head(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Down) else self._run(layer, h, temb)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, temb)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Up) else self._run(layer, torch.cat([h, hs.pop()], dim=1), temb)
        return self.tail(h)

    @staticmethod
    def _run(block, h, temb):
        for layer in block:
            h = layer(h, temb)
        return h


def attention_level(cfg: Config) -> int:
    """--attn-level, where -1 takes the arch's: for cifar10 the level whose maps are 16 x 16, as the paper places
    it (the level nearest to 16 at sizes without one); for small and tiny, whose levels at their sizes (28, 14, 7;
    8, 4) have no 16 x 16, level 1. A checkpoint records the level it was built with."""
    levels = len(ARCHS[cfg.arch][1])
    if cfg.attn_level >= levels:
        raise common.UserError(f"--attn-level {cfg.attn_level}: --arch {cfg.arch} has levels 0 to {levels - 1}")
    if cfg.attn_level >= 0:
        return cfg.attn_level
    if cfg.arch != "cifar10":
        return 1
    return min(range(levels), key=lambda i: (abs(math.log2(image_size(cfg) / 2 ** i) - 4), -i))


def build(cfg: Config, device) -> UNet:
    ch, ch_mult, blocks = ARCHS[cfg.arch]
    size = image_size(cfg)
    if size % 2 ** (len(ch_mult) - 1):
        raise common.UserError(f"--image-size {size}: --arch {cfg.arch} halves it {len(ch_mult) - 1} times; use a "
                               f"multiple of {2 ** (len(ch_mult) - 1)}")
    return UNet(common.dataset_channels(cfg.dataset), ch, ch_mult, blocks, (attention_level(cfg),),
                cfg.dropout).to(device)


def image_size(cfg: Config) -> int:
    return cfg.image_size or common.DATASETS.get(cfg.dataset, (3, 64))[1]


def beta_range(cfg: Config) -> tuple[float, float]:
    """(beta_1, beta_T) of the linear schedule: as given, or (--beta-schedule scaled) times 1000 / T, below 1
    (Nichol & Dhariwal 2021's linear schedule for any T)."""
    scale = 1000 / cfg.T if cfg.beta_schedule == "scaled" else 1.0
    return min(cfg.beta_1 * scale, 0.999), min(cfg.beta_T * scale, 0.999)


# ----------------------------------------------------------------------------------------------
# Training: Algorithm 1, warm-up, clipping, EMA
# ----------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights, theta_ema <- decay theta_ema + (1 - decay) theta, in one
    fused foreach call per step (the official code's tf.train.ExponentialMovingAverage, no bias correction).
    ``ema.model`` is a network of its own, saved in the checkpoint as the model "ema"."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self._ema, self._src = list(self.model.parameters()), list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema, self._src, 1 - self.decay)


def train_step(model, ema: EMA, opt, diffusion: Diffusion, x0, step: int, cfg: Config,
               amp: torch.dtype | None = None, scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict:
    """Algorithm 1 on a batch x0, as update number ``step`` (from 0)."""
    if cfg.hflip:
        flip = torch.rand(len(x0), device=x0.device) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
    t = torch.randint(1, diffusion.T + 1, (len(x0),), device=x0.device)      # t ~ Uniform{1..T}
    eps = torch.randn_like(x0)
    with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
        eps_theta = model(diffusion.q_sample(x0, t, eps), t)
    loss = F.mse_loss(eps_theta.float(), eps)                                  # L_simple (eq. 14)
    for group in opt.param_groups:                                             # linear warm-up
        group["lr"] = cfg.lr * min(step / cfg.warmup, 1.0) if cfg.warmup else cfg.lr
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)   # no host sync: a tensor
    scaler.step(opt)
    scaler.update()
    ema.update()
    return {"loss": loss.detach(), "grad_norm": grad_norm}


# ----------------------------------------------------------------------------------------------
# Sampling: Algorithm 2 and DDIM
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model, diffusion: Diffusion, n: int, shape: tuple, sampler: str = "ddpm", steps: int = 50,
           eta: float = 0.0, generator=None, device=None) -> torch.Tensor:
    """n images in [-1, 1]. ``generator`` draws x_T and every z, in this order: the same generator state
    gives the same images."""
    device = device or next(model.parameters()).device
    randn = lambda: torch.randn((n, *shape), device=device, generator=generator)   # noqa: E731
    x = randn()                                                                     # x_T ~ N(0, I)
    if sampler == "ddpm":
        for t in range(diffusion.T, 0, -1):                                         # Algorithm 2
            tt = torch.full((n,), t, device=device)
            mean, _ = diffusion.p_mean(model, x, tt)
            x = mean + diffusion.at(diffusion.sigma2, tt).sqrt() * randn() if t > 1 else mean
        return x
    taus = ddim_timesteps(diffusion.T, steps)
    for t, t_prev in zip(reversed(taus), reversed([0] + taus[:-1])):                # DDIM, eq. 12
        tt = torch.full((n,), t, device=device)
        ab, ab_prev = diffusion.alpha_bar_list[t], diffusion.alpha_bar_list[t_prev]
        x0 = diffusion.predict_x0(x, tt, model(x, tt).float()).clamp(-1, 1)
        eps = (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)                          # re-derived from clipped x0
        s = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - s ** 2, 0.0)) * eps
        if t_prev > 0 and s > 0:
            x = x + s * randn()
    return x


def ddim_timesteps(T: int, S: int) -> list[int]:
    """The S steps tau_1 < ... < tau_S of DDIM, evenly spaced from t = 1: 1 + floor(i T / S), i = 0..S-1 (where
    S divides T, the DDIM code's uniform skip: 1, 1 + T/S, ...)."""
    if S > T:
        raise common.UserError(f"--sample-steps {S}: at most --T ({T})")
    return [1 + i * T // S for i in range(S)]


def load(path: str, device="cpu"):
    """(EMA network in eval mode, Diffusion) of a checkpoint, its config rebuilt from the checkpoint:

        model, diffusion = ddpm.load("runs/ddpm-fashion-mnist/ckpt.pt")
        images = ddpm.sample(model, diffusion, 16, (1, 28, 28))      # in [-1, 1], 16 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "ddpm")
    model = build(cfg, "cpu")
    model.load_state_dict(ckpt["models"]["ema"])
    return model.to(device).eval(), Diffusion(cfg.T, *beta_range(cfg), cfg.var, device)


def main():
    cfg = common.parse_config(Config)
    run = common.Run(cfg, "ddpm", command="--vlb" if cfg.vlb else None, shards=True)
    if not 0 < cfg.beta_1 <= cfg.beta_T:
        raise common.UserError(f"--beta-1 {cfg.beta_1} and --beta-T {cfg.beta_T}: the schedule needs 0 < beta_1 <= "
                               f"beta_T (beta_1 = 0 makes beta_tilde_1 0/0)")
    if cfg.eval_vlb and not cfg.eval_every and not run.sampling:
        raise common.UserError("--eval-vlb N goes with --eval-every N (on a checkpoint: --vlb N)")
    cfg.attn_level = attention_level(cfg)   # recorded: a checkpoint keeps the network it was built with
    device = run.device
    model = build(cfg, device)
    memory_format = torch.channels_last if cfg.channels_last and not run.sampling else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ema = EMA(model, cfg.ema_decay)
    diffusion = Diffusion(cfg.T, *beta_range(cfg), cfg.var, device)
    shape = (common.dataset_channels(cfg.dataset), image_size(cfg), image_size(cfg))
    if cfg.sampler == "ddim":
        ddim_timesteps(cfg.T, cfg.sample_steps)   # a bad --sample-steps is refused before anything is done
    run.say(f"T = {cfg.T}, beta from {diffusion.beta_list[1]:.3g} to {diffusion.beta_list[-1]:.3g} "
            f"({cfg.beta_schedule}): alpha_bar_T = {diffusion.alpha_bar_list[-1]:.3g}")
    if diffusion.alpha_bar_list[-1] > 1e-2:   # x_T = sqrt(alpha_bar_T) x_0 + ...: far from the N(0, I) we sample
        common.warn(f"alpha_bar_T = {diffusion.alpha_bar_list[-1]:.3g}: x_T keeps much of x_0, but sampling starts from "
                    f"N(0, I); use more steps (--T 1000) or --beta-schedule scaled")

    def draw(n: int, generator) -> torch.Tensor:   # grids, --eval-every and --sample: the EMA weights
        return sample(ema.model, diffusion, n, shape, cfg.sampler, cfg.sample_steps, cfg.eta, generator, device)

    run.say(f"U-Net ({cfg.arch}): {common.count_parameters(model):,} parameters")

    if run.sampling:   # --sample N or --vlb N: the checkpoint's EMA weights, no training
        run.track(models={"ema": ema.model})
        run.start()
        if cfg.vlb:
            test = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test")[:cfg.vlb]
            bpd = vlb_bpd(ema.model, diffusion, test, seed=cfg.seed, progress=lambda i, n, s: run.say(
                f"L_vlb: {i}/{n} test images | {common.duration(s)} | ETA {common.duration(s * (n - i) / i)}"))
            print(f"test_bpd: {bpd:.4f}  (L_vlb in bits/dim on {len(test)} test images, EMA weights)")
        else:
            settings = {k: getattr(cfg, k) for k in ("sampler", "sample_steps", "eta", "var")}
            run.write_sharded(draw, cfg.sample, batch=500, key=settings)
        return

    images = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg))
    test = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test")[:cfg.eval_vlb] \
        if cfg.eval_every and cfg.eval_vlb else None
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=run.rank, world=run.world,
                             memory_format=memory_format)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)
    if run.world > 1:  # torchrun: one process per GPU, gradients averaged across processes
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)

    def evaluate(should_stop) -> dict | None:   # --eval-vlb; None when a stop request cut it short
        bpd = vlb_bpd(ema.model, diffusion, test, seed=cfg.seed, should_stop=should_stop)
        return None if bpd is None else {"test_bpd": bpd}

    grid = torch.Generator(device)   # the same noise for every grid of the run
    run.track(models={"model": model, "ema": ema.model}, optimizers={"model": opt}, data={"train": batches},
              state={"scaler": scaler}, sample=lambda: draw(64, grid.manual_seed(cfg.seed)),
              generate=draw, real=images, evaluate=evaluate if test is not None else None)
    step = run.start()
    while step < cfg.steps and not run.stop_requested:
        losses = train_step(model, ema, opt, diffusion, batches.next(), step, cfg, run.amp, scaler)
        step += 1
        run.end_step(step, losses)
    run.finish(step)


if __name__ == "__main__":
    common.run_main(main)
