"""Denoising Diffusion Probabilistic Models.

Jonathan Ho, Ajay Jain, Pieter Abbeel. NeurIPS 2020. arXiv:2006.11239. Results and every command: docs/ddpm.md

Forward process (eq. 2, 4), a fixed Markov chain of Gaussian noise, variances beta_1..beta_T, alpha_t = 1 - beta_t:
    q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
    q(x_t | x_0)     = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I),   alpha_bar_t = prod_{s <= t} alpha_s
Its posterior (eq. 6, 7), tractable given x_0: q(x_{t-1} | x_t, x_0) = N(mu_tilde_t, beta_tilde_t I),
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
DDIM (Song, Meng, Ermon 2020, arXiv:2010.02502, eq. 12), by flag: the same network on S of the T steps (the
DDIM code's uniform skip tau_i = 1 + floor(i T / S), i = 0..S-1), from t to t':
    x_{t'} = sqrt(alpha_bar_t') x_0 + sqrt(1 - alpha_bar_t' - s^2) eps + s z,
    s = eta sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) sqrt(1 - alpha_bar_t / alpha_bar_t');  eta = 0: deterministic.

The paper's setup (section 4, appendix B) is the default: T = 1000, beta linear from 1e-4 to 0.02 (in float64), a
U-Net (PixelCNN++ backbone) of ResNet blocks with GroupNorm and the embedding of t, dropout 0.1, Adam lr 2e-4 warmed up
over 5,000 steps, gradients clipped at norm 1, batch 128, samples from an EMA of the weights (decay 0.9999).
--arch cifar10 --hflip is its CIFAR-10 U-Net (ch 128, ch_mult 1,2,2,2, attention at 16 x 16: 35,746,307 parameters)
and flips; --arch small, the default, is a quarter as wide and one level shorter (1,623,169 parameters).

Deviations, each deliberate (docs/ddpm.md says why):
- The predicted x_0 is clipped to [-1, 1] before mu_theta is formed, in sampling and in L_vlb (the official code).
- DDIM clips x_0 too and re-derives eps from it (guided-diffusion): eta = 1, S = T is Algorithm 2 with beta_tilde.
- sigma_1^2 is beta_tilde_2 under both --var settings, as in the official code.
- L_0 uses the exact normal CDF (eq. 13), not the official code's tanh approximation.
- Update s (from 0) has the learning rate 2e-4 min(s / 5000, 1), the official warm-up: the first one has lr 0.
- The network is given the paper's t = 1..T; the official code feeds t - 1 to the embedding.
- Downsampling's stride-2 convolution pads symmetrically (padding=1), not as TensorFlow's SAME (right, bottom).
- GroupNorm's eps is PyTorch's 1e-5 (official: 1e-6); at 32 channels its 32 groups are instance norm.
- --beta-schedule scaled multiplies the paper's betas by 1000 / T, so that another --T still ends near N(0, I).

Usage (every command, the results and the speed: docs/ddpm.md):
    python ddpm.py                                     # Fashion-MNIST 28 x 28, the small U-Net
    python ddpm.py --resume                            # continue runs/ddpm-fashion-mnist (a requeued job too)
    GPUS=4 sbatch submit.sh ddpm --dataset cifar10 --arch cifar10 --hflip   # the paper's CIFAR-10 run on 4 GPUs
    python ddpm.py --sample 50000 --sample-out samples/ --sampler ddim      # for fid.py; split, resumable
    python ddpm.py --vlb 10000                         # L_vlb in bits/dim on 10,000 test images
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
import fid
from common import arg

# name -> (ch, ch_mult, blocks per resolution); self-attention: attention_level
ARCHS = {"tiny": (32, (1, 2), 1),              # for the tests and a first look
         "small": (32, (1, 2, 2), 2),
         "cifar10": (128, (1, 2, 2, 2), 2)}   # the paper's CIFAR-10 U-Net


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(100_000, "optimizer steps (the paper: 800,000 for CIFAR-10)", run=True, min=0)
    sample_every: int = arg(5000, "write a sample grid (--sampler) every N steps", run=True, min=1)
    vlb: int = arg(0, "no training: L_vlb in bits/dim on the first N test images (EMA weights)", command=True, min=0)
    score: str = arg("", "no training: anomaly scores of IMAGES (train, test, validation or an .npz), higher = more "
                     "anomalous, to --score-out", command=True, metavar="IMAGES")
    score_out: str = arg("", "the CSV of --score (default: <out>/scores-<IMAGES>.csv)", command=True, metavar="PATH")
    score_t0: int = arg(250, "--score: AnoDDPM's t0, the noise level the images are reconstructed from", command=True,
                        min=1)
    eval_vlb: int = arg(0, "with --eval-every: also L_vlb in bits/dim on the first N test images, to metrics.csv "
                        "(test_bpd)", run=True, min=0)
    # Sampling (grids, --eval-every, --sample): none of these changes the training
    sampler: str = arg("ddpm", "ddpm (Algorithm 2, T steps) | ddim (S steps)", run=True, choices=("ddpm", "ddim"))
    sample_steps: int = arg(50, "DDIM's S: steps of --sampler ddim", run=True, min=1)
    eta: float = arg(0.0, "DDIM's eta: 0 deterministic, 1 the ancestral sampler's noise", run=True, min=0, max=1)
    var: str = arg("beta", "sigma_t^2 of the reverse process: beta (the paper's CIFAR-10 choice) | beta-tilde",
                   run=True, choices=("beta", "beta-tilde"))
    guidance: float = arg(0.0, "--classes: w of classifier-free guidance, eps = (1 + w) eps(z, c) - w eps(z) (0: the "
                          "conditional model; others write cond_scale = 1 + w, or s = 1 + w where s = 1 is no "
                          "guidance)", run=True, min=0)
    class_: int = arg(-1, "with --sample of a --classes model: this class only (-1: N/K of each)", sampling=True,
                      min=-1, flag="--class")
    # Classifier-free guidance (Ho & Salimans 2022, arXiv:2207.12598)
    classes: bool = arg(False, "class-conditional: a class embedding added to the time embedding, and a learned "
                        "null class for the unconditional model")
    cond_drop: float = arg(0.1, "--classes: the probability that a training image's class is the null one (Table 1: "
                           "0.1 to 0.2 best, 0.5 worst)", min=0, max=1)
    # The paper's hyper-parameters (section 4, appendix B)
    image_size: int = arg(0, "0: the dataset's (28 Fashion-MNIST, 32 CIFAR-10); a multiple of 2^(levels - 1)", min=0)
    arch: str = arg("small", "U-Net: small (CPU-sized, for 28 x 28) | cifar10 (the paper's, 35.7M parameters) | "
                    "tiny (tests)", choices=tuple(ARCHS))
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
        beta_tilde = (1 - alpha_bar_prev) / (1 - alpha_bar).clamp(min=1e-20) * beta   # eq. 7; beta_tilde_0, _1 = 0
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
    mass = torch.where(x < -0.999, cdf_plus, torch.where(x > 0.999, 1 - cdf_min, cdf_plus - cdf_min))
    return mass.clamp(min=1e-12).log()


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


class Resample(nn.Module):
    """Down: a stride-2 convolution 3x3; up: nearest-neighbour x2, then a convolution 3x3 (official)."""

    def __init__(self, ch: int, up: bool):
        super().__init__()
        self.up = up
        self.conv = init_(nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1))

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.up else x)


class UNet(nn.Module):
    """eps_theta(x_t, t). At --arch cifar10, 3 x 32 x 32 (ch 128):
        conv 128 @32 -> [2 ResBlocks 128] @32 -> down -> [2 ResBlocks 256 + attention] @16 -> down ->
        [2 x 256] @8 -> down -> [2 x 256] @4 -> middle: ResBlock, attention, ResBlock @4 -> the mirror
        image with 3 ResBlocks per resolution, each fed the concatenated skip -> GroupNorm, swish, conv 3
    """

    def __init__(self, channels: int, ch: int, ch_mult: tuple, num_res_blocks: int, attn: tuple, dropout: float,
                 classes: int = 0):
        super().__init__()
        tdim, self.ch, self.classes = 4 * ch, ch, classes
        self.temb = nn.Sequential(init_(nn.Linear(ch, tdim)), nn.SiLU(), init_(nn.Linear(tdim, tdim)))
        if classes:   # classifier-free guidance: K classes and the null class K, added to the time embedding
            self.class_emb = nn.Embedding(classes + 1, tdim)
        self.head = init_(nn.Conv2d(channels, ch, 3, padding=1))
        self.down, skips, now = nn.ModuleList(), [ch], ch
        for level, mult in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(self._block(now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
                skips.append(now)
            if level != len(ch_mult) - 1:
                self.down.append(Resample(now, up=False))
                skips.append(now)
        self.middle = nn.ModuleList([ResBlock(now, now, tdim, dropout), Attention(now),
                                     ResBlock(now, now, tdim, dropout)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(self._block(skips.pop() + now, ch * mult, tdim, dropout, level in attn))
                now = ch * mult
            if level != 0:
                self.up.append(Resample(now, up=True))
        self.tail = nn.Sequential(nn.GroupNorm(32, now), nn.SiLU(), init_(nn.Conv2d(now, channels, 3, padding=1), 0))

    @staticmethod
    def _block(cin, cout, tdim, dropout, attention: bool):
        return nn.ModuleList([ResBlock(cin, cout, tdim, dropout)] + ([Attention(cout)] if attention else []))

    def forward(self, x, t, y=None):
        temb = self.temb(timestep_embedding(t, self.ch))
        if self.classes:   # y = None: the null class, the unconditional model
            temb = temb + self.class_emb(torch.full_like(t, self.classes) if y is None else y)
        h = self.head(x)
        hs = [h]
        for layer in self.down:
            h = layer(h) if isinstance(layer, Resample) else self._run(layer, h, temb)
            hs.append(h)
        h = self._run(self.middle, h, temb)
        for layer in self.up:
            h = layer(h) if isinstance(layer, Resample) else self._run(layer, torch.cat([h, hs.pop()], dim=1), temb)
        return self.tail(h)

    @staticmethod
    def _run(block, h, temb):
        for layer in block:
            h = layer(h, temb)
        return h


def attention_level(cfg: Config) -> int:
    """--attn-level, where -1 takes the arch's: for cifar10 the level whose maps are 16 x 16, as the paper places it
    (the level nearest to 16 at sizes without one); for small and tiny (levels 28, 14, 7; 8, 4: no 16 x 16), level 1."""
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
    classes = common.CLASSES.get(cfg.dataset, 0) if cfg.classes else 0
    if cfg.classes and not classes:
        raise common.UserError(f"--classes: --dataset {cfg.dataset} has no labels; use {', '.join(common.CLASSES)}")
    return UNet(common.dataset_channels(cfg.dataset), ch, ch_mult, blocks, (attention_level(cfg),),
                cfg.dropout, classes).to(device)


def image_size(cfg: Config) -> int:
    return cfg.image_size or common.DATASETS.get(cfg.dataset, (3, 64))[1]


def beta_range(cfg: Config) -> tuple[float, float]:
    """(beta_1, beta_T) as given, or times 1000 / T up to 0.999 (--beta-schedule scaled, Nichol & Dhariwal 2021)."""
    scale = 1000 / cfg.T if cfg.beta_schedule == "scaled" else 1.0
    return min(cfg.beta_1 * scale, 0.999), min(cfg.beta_T * scale, 0.999)


# ----------------------------------------------------------------------------------------------
# Training: Algorithm 1, warm-up, clipping, EMA
# ----------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights, theta_ema <- decay theta_ema + (1 - decay) theta, in one
    fused foreach call per step (the official code's tf.train.ExponentialMovingAverage, no bias correction)."""

    def __init__(self, model: nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self._ema, self._src = decay, list(self.model.parameters()), list(model.parameters())

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self._ema, self._src, 1 - self.decay)


def train_step(model, ema: EMA, opt, diffusion: Diffusion, x0, step: int, cfg: Config,
               amp: torch.dtype | None = None, scaler=torch.amp.GradScaler("cpu", enabled=False), y=None) -> dict:
    """Algorithm 1 on a batch x0, as update number ``step`` (from 0); with classes y (--classes), each replaced by
    the null class with probability --cond-drop (Ho & Salimans, Algorithm 1)."""
    if cfg.hflip:
        flip = torch.rand(len(x0), device=x0.device) < 0.5
        x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(3), x0)
    t = torch.randint(1, diffusion.T + 1, (len(x0),), device=x0.device)      # t ~ Uniform{1..T}
    eps = torch.randn_like(x0)
    if y is not None:                                                          # c <- null with probability p_uncond
        y = torch.where(torch.rand(len(y), device=y.device) < cfg.cond_drop, common.unwrap(model).classes, y)
    with torch.autocast(x0.device.type, dtype=amp, enabled=amp is not None):
        eps_theta = model(diffusion.q_sample(x0, t, eps), t, y)
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
    return {"loss": loss.detach(), "grad_norm": grad_norm.nan_to_num(0.0, 0.0)}   # an fp16 step skipped: inf


# ----------------------------------------------------------------------------------------------
# Sampling: Algorithm 2 and DDIM
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def guided(model, y, w: float):
    """eps~(z_t, c) = (1 + w) eps(z_t, c) - w eps(z_t) (Ho & Salimans, eq. 6), both passes in one batch of 2B;
    w = 0 is the conditional pass alone."""
    def eps(x, t):
        if w == 0:
            return model(x, t, y)
        e_c, e_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.classes)]))\
            .chunk(2)
        return (1 + w) * e_c - w * e_u
    return eps


def sample(model, diffusion: Diffusion, n: int, shape: tuple, sampler: str = "ddpm", steps: int = 50,
           eta: float = 0.0, generator=None, device=None, y=None, w: float = 0.0) -> torch.Tensor:
    """n images in [-1, 1]; ``generator`` draws x_T, then every z: the same generator state gives the same images.
    With classes y: classifier-free guidance of weight w (Ho & Salimans, Algorithm 2), ancestral or DDIM."""
    device = device or next(model.parameters()).device
    model = model if y is None else guided(model, y, w)
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


@torch.no_grad()
def anomaly_scores(model, diffusion: Diffusion, images: torch.Tensor, cfg: Config, batch: int = 250) -> dict:
    """Two scores of each uint8 image, higher = more anomalous: AnoDDPM's partial-diffusion reconstruction error
    (x_0 noised to t0 by eq. 4, brought back by DDIM with eta 0 in --sample-steps steps, the mean squared error), and
    the eps-prediction error of eq. 14 averaged over t = T/20, T/10, T/4, T/2. Image i's noise comes from a
    generator seeded by (--seed, i) and GroupNorm is per image: its score does not depend on the other images."""
    device, t0 = next(model.parameters()).device, min(cfg.score_t0, diffusion.T)
    taus = sorted({t for t in ddim_timesteps(diffusion.T, min(cfg.sample_steps, diffusion.T)) if t < t0} | {t0})
    ts = sorted({max(1, diffusion.T * k // 20) for k in (1, 2, 5, 10)})
    recon, eps_error = [], []
    for i in range(0, len(images), batch):
        x0 = images[i:i + batch].to(device).float() / 127.5 - 1
        gens = [torch.Generator().manual_seed(cfg.seed * 1_000_003 + j) for j in range(i, i + len(x0))]
        noise = lambda: torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)   # noqa
        x = diffusion.q_sample(x0, torch.full((len(x0),), t0, device=device), noise())
        for t, t_prev in zip(reversed(taus), reversed([0] + taus[:-1])):                 # DDIM, eta = 0
            tt = torch.full((len(x0),), t, device=device)
            x_0 = diffusion.predict_x0(x, tt, model(x, tt).float()).clamp(-1, 1)
            ab, ab_prev = diffusion.alpha_bar_list[t], diffusion.alpha_bar_list[t_prev]
            x = math.sqrt(ab_prev) * x_0 + math.sqrt(1 - ab_prev) * (x - math.sqrt(ab) * x_0) / math.sqrt(1 - ab)
        recon.append((x - x0).pow(2).flatten(1).mean(1).cpu())
        error = 0
        for t in ts:
            tt, eps = torch.full((len(x0),), t, device=device), noise()
            error = error + (model(diffusion.q_sample(x0, tt, eps), tt).float() - eps).pow(2).flatten(1).mean(1)
        eps_error.append((error / len(ts)).cpu())
    return {"recon": torch.cat(recon), "eps_error": torch.cat(eps_error)}


def ddim_timesteps(T: int, S: int) -> list[int]:
    """DDIM's S steps tau_i = 1 + floor(i T / S), i = 0..S-1: the DDIM code's uniform skip where S divides T."""
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


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "ddpm", ddp)      # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: the U-Net and its EMA, the diffusion, data, Adam (section 4, appendix B) --------------------
    if not 0 < cfg.beta_1 <= cfg.beta_T:
        raise common.UserError(f"--beta-1 {cfg.beta_1} and --beta-T {cfg.beta_T}: the schedule needs 0 < beta_1 <= "
                               f"beta_T (beta_1 = 0 makes beta_tilde_1 0/0)")
    if cfg.eval_vlb and not cfg.eval_every:
        raise common.UserError("--eval-vlb N goes with --eval-every N (on a checkpoint: --vlb N)")
    if cfg.sampler == "ddim":
        ddim_timesteps(cfg.T, cfg.sample_steps)     # a bad --sample-steps is refused before anything is done
    cfg.attn_level = attention_level(cfg)           # recorded: a checkpoint keeps the network it was built with
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build(cfg, device).to(memory_format=memory_format)
    run.say(f"U-Net ({cfg.arch}): {common.count_parameters(model):,} parameters")
    ema = EMA(model, cfg.ema_decay)                 # a network of its own, saved as "ema": grids and evaluation use it
    diffusion = Diffusion(cfg.T, *beta_range(cfg), cfg.var, device)
    images, labels = common.training_set(cfg)      # --per-class N: the subset augment.py draws
    test = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test")[:cfg.eval_vlb] \
        if cfg.eval_every and cfg.eval_vlb else None
    classes = model.classes                         # --classes: (images, labels) batches, a grid row per class
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=ddp.rank, world=ddp.world,
                             memory_format=memory_format, labels=labels if classes else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)   # train_step sets each update's warm-up lr
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    grid = torch.Generator(device)                  # the grids' own noise, the same for every grid of the run
    saved = dict(models={"model": model, "ema": ema.model}, optimizers={"model": opt}, data={"train": batches},
                 state={"scaler": scaler})          # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        model = nn.parallel.DistributedDataParallel(model, device_ids=ddp.device_ids)
    if cfg.compile:
        model = torch.compile(model)
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, images) if cfg.eval_every else None

    def save_samples(step: int) -> None:            # Algorithm 2 (or DDIM) from the EMA weights, the grid's noise
        with common.eval_mode(ema.model):
            y = torch.arange(classes, device=device).repeat_interleave(8) if classes else None
            common.save_grid(draw(len(y) if classes else 64, grid.manual_seed(cfg.seed), y),
                             run.out / "samples" / f"{step:06d}.png", nrow=8 if classes else None)

    def draw(n: int, generator, y=None) -> torch.Tensor:   # grids and --eval-every's samples (classes uniform)
        if classes and y is None:
            y = torch.randint(classes, (n,), device=device, generator=generator)
        return sample(ema.model, diffusion, n, images.shape[1:], cfg.sampler, cfg.sample_steps, cfg.eta, generator,
                      y=y, w=cfg.guidance)

    def test_bpd(should_stop) -> dict | None:       # --eval-vlb: L_vlb on the test images; None: off, or cut short
        bpd = vlb_bpd(ema.model, diffusion, test, seed=cfg.seed, should_stop=should_stop) if test is not None else None
        return None if bpd is None else {"test_bpd": bpd}

    run.say(f"T = {cfg.T}, beta from {diffusion.beta_list[1]:.3g} to {diffusion.beta_list[-1]:.3g} "
            f"({cfg.beta_schedule}): alpha_bar_T = {diffusion.alpha_bar_list[-1]:.3g}")
    if diffusion.alpha_bar_list[-1] > 1e-2:         # x_T far from N(0, I); said after every refusal (one line each)
        common.warn(f"alpha_bar_T = {diffusion.alpha_bar_list[-1]:.3g}: x_T keeps much of x_0, but sampling starts "
                    f"from N(0, I); use more steps (--T 1000) or --beta-schedule scaled")
    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        x0, y = batches.next() if classes else (batches.next(), None)
        losses = train_step(model, ema, opt, diffusion, x0, step, cfg, amp, scaler, y)   # Algorithm 1
        step += 1
        log.add(losses)
        if step % cfg.log_every == 0:
            log.write(step)
        if step % cfg.sample_every == 0 and ddp.rank == 0:
            save_samples(step)
        best = evaluate is not None and step % cfg.eval_every == 0 and evaluate(step, draw, log, stop, extra=test_bpd)
        if step % cfg.ckpt_every == 0 or best or (cfg.keep_every and step % cfg.keep_every == 0):
            common.save_run(run, step, log, **saved, best=best)
    common.finish(run, step, log, stop, **saved)    # the last checkpoint, then how the run ended
    if ddp.rank == 0 and step > run.start_step and step % cfg.sample_every and not stop.requested:
        save_samples(step)                          # and the last step's grid (minutes on a CPU: not after a signal)


def sample_command(cfg: Config) -> None:
    """--sample N: N images of the checkpoint's EMA weights in --sample-out, split among processes and resumable."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "ddpm", ddp, command="--sample")
    stop = common.Stop(ddp)
    if cfg.sampler == "ddim":
        ddim_timesteps(cfg.T, cfg.sample_steps)     # refused before the folder is touched
    model, diffusion = build(cfg, ddp.device).eval(), Diffusion(cfg.T, *beta_range(cfg), cfg.var, ddp.device)
    common.load_models(run, ema=model)
    shape = (common.dataset_channels(cfg.dataset), image_size(cfg), image_size(cfg))
    settings = {k: getattr(cfg, k) for k in ("sampler", "sample_steps", "eta", "var", "guidance")}   # fix the images
    if cfg.class_ >= max(model.classes, 1):
        raise common.UserError(f"--class {cfg.class_}: a --classes model's classes are 0 to {model.classes - 1}"
                               if model.classes else "--class goes with a --classes model")
    draw = lambda n, g, y=None: sample(model, diffusion, n, shape, cfg.sampler, cfg.sample_steps, cfg.eta, g,  # noqa
                                       y=y, w=cfg.guidance)
    common.write_sharded(run, draw, cfg.sample, 500, settings, stop, classes=model.classes)


def score_command(cfg: Config) -> None:
    """--score IMAGES: each image's anomaly scores (higher = more anomalous) in a CSV, for anomaly.py."""
    run = common.resolve_run(cfg, "ddpm", common.Processes(cfg.device, connect=False), command="--score")
    model, diffusion = build(cfg, run.ddp.device).eval(), Diffusion(cfg.T, *beta_range(cfg), cfg.var, run.ddp.device)
    common.load_models(run, ema=model)
    images, labels = common.score_images(cfg, cfg.score)
    common.write_scores(run, anomaly_scores(model, diffusion, images, cfg), labels)


def vlb_command(cfg: Config) -> None:
    """--vlb N: L_vlb in bits/dim of the checkpoint's EMA weights on the first N test images (Table 1)."""
    run = common.resolve_run(cfg, "ddpm", common.Processes(cfg.device, connect=False), command="--vlb")
    model, diffusion = build(cfg, run.ddp.device).eval(), Diffusion(cfg.T, *beta_range(cfg), cfg.var, run.ddp.device)
    common.load_models(run, ema=model)
    test = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test")[:cfg.vlb]
    bpd = vlb_bpd(model, diffusion, test, seed=cfg.seed, progress=lambda i, n, s: print(
        f"L_vlb: {i}/{n} test images | {common.duration(s)} | ETA {common.duration(s * (n - i) / i)}", flush=True))
    print(f"test_bpd: {bpd:.4f}  (L_vlb in bits/dim on {len(test)} test images, EMA weights)")


def main():
    cfg = common.parse_config(Config)
    command = vlb_command if cfg.vlb else score_command if cfg.score else sample_command if cfg.sample else train
    command(cfg)


if __name__ == "__main__":
    common.run_main(main)
