"""Density estimation using Real NVP.

Laurent Dinh, Jascha Sohl-Dickstein, Samy Bengio. ICLR 2017. arXiv:1605.08803. Results: docs/realnvp.md

A bijection f from data space to a latent space with a standard normal prior p_Z gives the exact
log-likelihood by the change of variables (section 3.1):
    log p_X(x) = log p_Z(f(x)) + log |det(df(x) / dx^T)|
f is a stack of affine coupling layers (section 3.2), each of which leaves the d dimensions picked by a binary mask b
unchanged and scales and shifts the others by functions s, t of the unchanged ones (masked form, eq. 9):
    y = b * x + (1 - b) * (x * exp(s(b * x)) + t(b * x)),       log|det dy/dx| = sum_j ((1 - b) * s(b * x))_j
Its Jacobian is triangular, so the determinant is that product of scales (section 3.3), and its inverse needs
no inverse of s or t: x = b * y + (1 - b) * (y - t(b * y)) * exp(-s(b * y)). s and t are deep
ResNets; s is a tanh times a learned scale (section 4.1), t has an affine output.

Masks (section 3.4): a spatial checkerboard, b = 1 where i + j is even (or odd); and channel-wise, b = 1 on the first
(or last) half of the channels. The squeeze (section 3.6) turns each 2 x 2 x c block into 1 x 1 x 4c
(channel 4k + 2 dy + dx). Multi-scale architecture (section 3.6, Figure 4), recursively: at each scale, 3 couplings
with alternating checkerboard masks, a squeeze, 3 couplings with alternating channel-wise masks, and half of the
dimensions are factored out into z, the other half goes on; the last scale is 4 checkerboard couplings. Batch
normalization (section 3.7, appendix E) follows every coupling: y = (x - mu) / sqrt(sigma^2 + eps) per channel,
log|det| = -1/2 sum log(sigma^2 + eps) over C x H x W; mu, sigma^2 are the minibatch's in training, running averages
(momentum 0.1, eps 1e-4) at test time. Inside s and t: batch norm and weight norm (section 3.7).

Pre-processing (section 4.1): an 8-bit image x in {0..255}^D is dequantized with uniform noise, and the
flow models the logit of the result, squeezed into [alpha, 1 - alpha] to keep away from the boundaries:
    x~ = (x + u) / 256,  u ~ U[0, 1)^D                  x~ in [0, 1)^D
    y  = logit(alpha + (1 - 2 alpha) x~),  alpha = 0.05,   log|det dy/dx~| = sum_j log((1 - 2 alpha) / (p_j (1 - p_j)))
with p = alpha + (1 - 2 alpha) x~. The density of x + u on [0, 256)^D is p(x~) / 256^D, so the negative
log-likelihood in bits per dimension of the 8-bit pixels (Table 1; in expectation over u, an upper bound on
the discrete -log2 P(x) / D) is
    bits/dim = (-log p_Y(y) - log|det dy/dx~| + D log 256) / (D log 2),
    log p_Y(y) = log N(f(y); 0, I) + log|det df/dy|.
Training maximizes log p(x~) by Adam (section 4.1): lr 1e-3, default betas, batch 64, and an L2 penalty
5e-5 sum g^2 on the weight scale parameters (the weight-norm scales g, and here also the tanh scales).
--arch cifar10 is the paper's CIFAR-10 model (2 scales, 8 residual blocks, 64 feature maps doubled at each
scale and in the channel-wise couplings: 19,637,884 parameters); --arch small, the default, is the same design
for 28 x 28 on a CPU (3 scales, 1 x 28 x 28 -> 2 x 14 x 14 -> 4 x 7 x 7, 2 blocks, 16 maps: 1,452,642 parameters).

Deviations, each deliberate (docs/realnvp.md says more):
- The affine map is the paper's x * exp(s) + t (eq. 9); the official code computes (x + t) * exp(s).
- The flow's batch norm normalizes the whole coupling output (section 3.7); the official code only the changed half.
- Appendix E's lagged batch statistics are off (official bn_lag = 0); --bpd also reports recalibrated running averages.
- Sampling inverts the flow with every batch norm's running averages (eval mode), not the official decoder(train=True).
- The logit's input is alpha + (1 - 2 alpha) x~ (the official data_constraint); the paper writes alpha + (1 - alpha) x~.
- tanh(s)'s learned scale is one scalar per coupling (official); the L2 penalty covers all (official: not channel-wise).
- Every convolution of s and t has a weight-norm g, starting at ||v|| (official: some of them, v at its own scale).
- In s and t, batch norm also learns a scale (official: shift only); the normalized input is not doubled (official: 2x).
- Gradients are clipped at global norm 100, the official code's clip_gradient (the paper is silent).
- Sampling temperature (--temperature T, z ~ N(0, T^2 I)) is Glow's (Kingma & Dhariwal 2018), not the paper's.
- The paper does not give its number of updates; --steps 50,000 (53 epochs of Fashion-MNIST) is ours.

Usage (every command, the results and the speed: docs/realnvp.md):
    python realnvp.py                                   # Fashion-MNIST 28 x 28, --arch small
    python realnvp.py --resume                          # continue runs/realnvp-fashion-mnist (a requeued job too)
    GPUS=4 sbatch submit.sh realnvp --dataset cifar10 --arch cifar10 --hflip   # the paper's CIFAR-10 model, 4 GPUs
    python realnvp.py --bpd 10000                       # test bits/dim of the checkpoint on 10,000 test images
    python realnvp.py --sample 10000 --sample-out samples.npz --temperature 0.7   # for fid.py
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import fid
from common import arg

# name -> (scales, residual blocks in each s/t ResNet, feature maps at the first scale)
ARCHS = {"tiny": (2, 1, 8),              # for the tests
         "small": (3, 2, 16),            # CPU-sized, for 28 x 28 (the last scale at 7 x 7)
         "cifar10": (2, 8, 64)}          # the paper's CIFAR-10 model (section 4.1)
BN_MOMENTUM, BN_EPS = 0.1, 1e-4          # running averages and epsilon of every batch norm (official code)


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(50_000, "optimizer steps (not in the paper; 53 Fashion-MNIST epochs at batch 64)", run=True, min=0)
    bpd: int = arg(0, "no training: bits/dim of the checkpoint on the first N test images, with the running "
                   "averages as saved and recalibrated (--recalibrate)", command=True, min=0)
    score: str = arg("", "no training: anomaly scores of IMAGES (train, test, validation or an .npz), higher = more "
                     "anomalous, to --score-out", command=True, metavar="IMAGES")
    score_out: str = arg("", "the CSV of --score (default: <out>/scores-<IMAGES>.csv)", command=True, metavar="PATH")
    recalibrate: int = arg(100, "with --bpd: also the bits/dim with every batch norm's running averages replaced by "
                           "the mean statistics of N training minibatches (0: off)", command=True, min=0)
    eval_bpd: int = arg(10_000, "with --eval-every: also the bits/dim of the first N test images, to metrics.csv "
                        "(test_bpd; 0: off; --dataset folder has no test split: off)", run=True, min=0)
    temperature: float = arg(1.0, "standard deviation T of z ~ N(0, T^2 I) for grids, --eval-every and --sample "
                             "(1: the model; below 1: Glow's reduced temperature)", run=True, min=0)
    # The paper's hyper-parameters (section 4.1)
    image_size: int = arg(0, "0: the dataset's (28 Fashion-MNIST, 32 CIFAR-10); a multiple of 2^(scales - 1)", min=0)
    arch: str = arg("small", "small (CPU-sized, 3 scales for 28 x 28) | cifar10 (the paper's: 2 scales, 8 blocks, "
                    "64 feature maps) | tiny (tests)", choices=tuple(ARCHS))
    batch_size: int = arg(64, "minibatch size (global, shared among processes)", min=1)
    lr: float = arg(1e-3, "Adam learning rate (default betas 0.9, 0.999)", above=0)
    l2: float = arg(5e-5, "coefficient of the L2 penalty on the weight scale parameters", min=0)
    alpha: float = arg(0.05, "the logit transform's margin: y = logit(alpha + (1 - 2 alpha) x~)", min=1e-6, max=0.499)
    grad_clip: float = arg(100.0, "clip the gradient's global norm at this value (official code)", above=0)
    hflip: bool = arg(False, "random horizontal flips of the training images (the paper: on for CIFAR-10)")
    channels_last: bool = arg(False, "NHWC memory layout for the convolutions (faster with --amp)", run=True)


# ----------------------------------------------------------------------------------------------
# s and t: a ResNet with batch norm and weight norm (sections 3.7, 4.1)
# ----------------------------------------------------------------------------------------------
class WNConv2d(nn.Conv2d):
    """Weight normalization (Salimans & Kingma 2016): w = g v / ||v||, one g per output channel; the
    convolution's ``weight`` is v. g starts at ||v||, so the layer starts as the plain convolution."""

    def __init__(self, cin: int, cout: int, kernel: int, bias: bool = True):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=bias)
        self.g = nn.Parameter(self.weight.detach().flatten(1).norm(dim=1))

    def forward(self, x):
        w = self.weight * (self.g / self.weight.flatten(1).norm(dim=1)).view(-1, 1, 1, 1)
        return self._conv_forward(x, w, self.bias)


class ResBlock(nn.Module):
    """Pre-activation block: h + conv(relu(bn(conv(relu(bn(h))))))."""

    def __init__(self, features: int):
        super().__init__()
        self.norm1, self.conv1 = nn.BatchNorm2d(features, eps=BN_EPS), WNConv2d(features, features, 3, bias=False)
        self.norm2, self.conv2 = nn.BatchNorm2d(features, eps=BN_EPS), WNConv2d(features, features, 3)

    def forward(self, h):
        return h + self.conv2(F.relu(self.norm2(self.conv1(F.relu(self.norm1(h))))))


class ResNet(nn.Module):
    """cin x H x W -> conv 3x3 -> [ResBlock] x blocks, a 1 x 1 convolution of the input and of every block's
    output summed -> bn, relu, conv 1x1 -> cout x H x W."""

    def __init__(self, cin: int, features: int, cout: int, blocks: int):
        super().__init__()
        self.conv_in = WNConv2d(cin, features, 3)
        self.blocks = nn.ModuleList(ResBlock(features) for _ in range(blocks))
        self.skips = nn.ModuleList(WNConv2d(features, features, 1) for _ in range(blocks + 1))
        self.norm_out, self.conv_out = nn.BatchNorm2d(features, eps=BN_EPS), WNConv2d(features, cout, 1)

    def forward(self, x):
        h = self.conv_in(x)
        out = self.skips[0](h)
        for block, skip in zip(self.blocks, self.skips[1:]):
            h = block(h)
            out = out + skip(h)
        return self.conv_out(F.relu(self.norm_out(out)))


# ----------------------------------------------------------------------------------------------
# The flow's layers: each returns (output, log|det Jacobian| per image) and has an inverse
# ----------------------------------------------------------------------------------------------
class Coupling(nn.Module):
    """Affine coupling (eq. 9) with a checkerboard mask on C x H x W (b = 1 where i + j + parity is even) or a
    channel-wise mask (the first half of the channels conditions the second; parity 1: the reverse).

        y = b * x + (1 - b) * (x * exp(s) + t),  s = scale * tanh(s'),  (t, s') = ResNet(b * x)
        log|det dy/dx| = sum_j ((1 - b) * s)_j
    """

    def __init__(self, channels: int, size: int, features: int, blocks: int, mask: str, parity: int):
        super().__init__()
        self.checkerboard, self.parity = mask == "checkerboard", parity
        if self.checkerboard:
            i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            self.register_buffer("b", ((i + j + parity) % 2 == 0).float().view(1, 1, size, size), persistent=False)
            cin, cout = channels, channels            # s, t see b * x and b itself
        else:
            cin = cout = channels // 2                # s, t see the conditioning half
        self.norm_in = nn.BatchNorm2d(cin, eps=BN_EPS)
        self.st = ResNet(2 * cin + self.checkerboard, features, 2 * cout, blocks)
        self.scale = nn.Parameter(torch.tensor(0.0 if self.checkerboard else 1.0))   # official initial values

    def s_t(self, x_cond):   # x_cond: b * x, or the conditioning half of the channels
        h = self.norm_in(x_cond)
        h = torch.cat([h, -h] + ([self.b.expand(len(h), -1, -1, -1)] if self.checkerboard else []), dim=1)
        t, s = self.st(F.relu(h)).to(x_cond.dtype).chunk(2, dim=1)   # float32 under autocast
        return self.scale * torch.tanh(s), t

    def _halves(self, x):
        a, b = x.chunk(2, dim=1)
        return (b, a) if self.parity else (a, b)     # (conditioning, changed)

    def forward(self, x):
        if self.checkerboard:
            s, t = self.s_t(x * self.b)
            s, t = s * (1 - self.b), t * (1 - self.b)   # b * x passes unchanged: exp(0) = 1, + 0
            return x * torch.exp(s) + t, s.flatten(1).sum(1)
        x_cond, x_change = self._halves(x)
        s, t = self.s_t(x_cond)
        y_change = x_change * torch.exp(s) + t
        y = torch.cat([y_change, x_cond] if self.parity else [x_cond, y_change], dim=1)
        return y, s.flatten(1).sum(1)

    def inverse(self, y):
        """Section 3.3: x = b * y + (1 - b) * (y - t) * exp(-s), s and t from the unchanged part b * y."""
        if self.checkerboard:
            s, t = self.s_t(y * self.b)
            return (y - t * (1 - self.b)) * torch.exp(-s * (1 - self.b))
        y_cond, y_change = self._halves(y)
        s, t = self.s_t(y_cond)
        x_change = (y_change - t) * torch.exp(-s)
        return torch.cat([x_change, y_cond] if self.parity else [y_cond, x_change], dim=1)


class BatchNorm(nn.Module):
    """Batch normalization as a layer of the flow (section 3.7, appendix E), per channel, no learned affine:

        y = (x - mu) / sqrt(sigma^2 + eps),   log|det dy/dx| = -1/2 H W sum_c log(sigma_c^2 + eps)
    mu and sigma^2 (biased) are the minibatch's in training, the running averages at test time and in the
    inverse (sampling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x):
        if self.training:
            mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean, BN_MOMENTUM)
                self.running_var.lerp_(var, BN_MOMENTUM)
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + BN_EPS).view(1, -1, 1, 1)
        logdet = -0.5 * torch.log(var + BN_EPS).sum() * x.shape[2] * x.shape[3]
        return y, logdet.expand(len(x))

    def inverse(self, y):
        return y * torch.sqrt(self.running_var + BN_EPS).view(1, -1, 1, 1) + self.running_mean.view(1, -1, 1, 1)


class Squeeze(nn.Module):
    """Section 3.6: each 2 x 2 x c block becomes 1 x 1 x 4c (channel 4k + 2 dy + dx holds channel k at
    offset (dy, dx), the official squeeze_2x2's order); a permutation: log|det| = 0."""

    def forward(self, x):
        return F.pixel_unshuffle(x, 2), x.new_zeros(len(x))

    def inverse(self, y):
        return F.pixel_shuffle(y, 2)


def factor_out(h):
    """Half of a squeezed 4c x H x W tensor goes on, the other half becomes part of z (section 3.6). As the
    official code (squeeze_2x2_ordered): the offsets (0, 0) and (1, 1) of every 2 x 2 block go on, (0, 1)
    and (1, 0) are factored out, each one checkerboard colour of the scale's input. A permutation."""
    n, c4, height, width = h.shape
    h = h.view(n, c4 // 4, 4, height, width)
    keep = torch.cat([h[:, :, 0], h[:, :, 3]], dim=1)      # 2c x H x W, offsets (0, 0) then (1, 1)
    z = torch.cat([h[:, :, 1], h[:, :, 2]], dim=1)         # 2c x H x W, offsets (0, 1) then (1, 0)
    return keep, z


def factor_in(keep, z):   # the inverse of factor_out
    n, c2, height, width = keep.shape
    c = c2 // 2
    h = torch.stack([keep[:, :c], z[:, :c], z[:, c:], keep[:, c:]], dim=2)   # n x c x 4 x H x W
    return h.reshape(n, 4 * c, height, width)


def logit_transform(x, alpha: float):
    """Section 4.1: y = logit(p), p = alpha + (1 - 2 alpha) x~, for x~ in [0, 1); per image,
    log|det dy/dx~| = sum_j log(1 - 2 alpha) - log p_j - log(1 - p_j)."""
    p = alpha + (1 - 2 * alpha) * x
    y = torch.log(p) - torch.log1p(-p)
    logdet = (math.log(1 - 2 * alpha) - torch.log(p) - torch.log1p(-p)).flatten(1).sum(1)
    return y, logdet


def logit_inverse(y, alpha: float):
    return (torch.sigmoid(y) - alpha) / (1 - 2 * alpha)


class RealNVP(nn.Module):
    """x~ (C x S x S, dequantized, in [0, 1)) -> logit -> the multi-scale flow -> z (a list, one tensor per
    scale). At --arch small on 1 x 28 x 28, feature maps F = 16 (doubled at each scale and in the
    channel-wise couplings), every coupling followed by BatchNorm:

        scale 0: 3 checkerboard couplings (F)   @ 1 x 28 x 28 -> squeeze -> 3 channel-wise (2F) @ 4 x 14 x 14
                 -> z_0: 2 x 14 x 14 factored out, 2 x 14 x 14 goes on
        scale 1: 3 checkerboard (2F) @ 2 x 14 x 14 -> squeeze -> 3 channel-wise (4F) @ 8 x 7 x 7
                 -> z_1: 4 x 7 x 7 factored out, 4 x 7 x 7 goes on
        scale 2: 4 checkerboard couplings (4F) @ 4 x 7 x 7 -> z_2: 4 x 7 x 7
    """

    def __init__(self, channels: int, size: int, scales: int, blocks: int, features: int, alpha: float = 0.05):
        super().__init__()
        self.alpha, self.image_shape = alpha, (channels, size, size)
        self.scales, self.z_shapes = nn.ModuleList(), []
        c, s = channels, size
        for i in range(scales):
            f = features * 2 ** i
            if i == scales - 1:   # the last scale: 4 alternating checkerboards
                layers = self._pairs(c, s, f, blocks, "checkerboard", (0, 1, 0, 1))
            else:
                layers = (self._pairs(c, s, f, blocks, "checkerboard", (0, 1, 0)) + [Squeeze()]
                          + self._pairs(4 * c, s // 2, 2 * f, blocks, "channel", (0, 1, 0)))
                c, s = 2 * c, s // 2
            self.z_shapes.append((c, s, s))
            self.scales.append(nn.ModuleList(layers))

    @staticmethod
    def _pairs(c, s, f, blocks, mask, parities):
        return [layer for p in parities for layer in (Coupling(c, s, f, blocks, mask, p), BatchNorm(c))]

    def forward(self, x):
        """(z, log|det dz/dx~|): z a list of tensors shaped as ``z_shapes``, the log-det per image."""
        h, logdet = logit_transform(x, self.alpha)
        zs = []
        for i, scale in enumerate(self.scales):
            for layer in scale:
                h, ld = layer(h)
                logdet = logdet + ld
            if i < len(self.scales) - 1:
                h, z = factor_out(h)
                zs.append(z)
        return zs + [h], logdet

    def inverse(self, zs):
        """x~ from z (the list that forward returns): every layer inverted, in reverse order."""
        h = zs[-1]
        for i in reversed(range(len(self.scales))):
            if i < len(self.scales) - 1:
                h = factor_in(h, zs[i])
            for layer in reversed(self.scales[i]):
                h = layer.inverse(h)
        return logit_inverse(h, self.alpha)


def build(cfg: Config, device) -> RealNVP:
    scales, blocks, features = ARCHS[cfg.arch]
    size = image_size(cfg)
    if size % 2 ** (scales - 1):
        raise common.UserError(f"--image-size {size}: --arch {cfg.arch} squeezes it {scales - 1} times; use a "
                               f"multiple of {2 ** (scales - 1)}")
    return RealNVP(common.dataset_channels(cfg.dataset), size, scales, blocks, features, cfg.alpha).to(device)


def image_size(cfg: Config) -> int:
    return cfg.image_size or common.DATASETS.get(cfg.dataset, (3, 32))[1]


# ----------------------------------------------------------------------------------------------
# The likelihood, in bits per dimension of the 8-bit pixels
# ----------------------------------------------------------------------------------------------
def log_prior(zs) -> torch.Tensor:
    """log N(z; 0, I) per image, summed over every scale's z."""
    return sum((-0.5 * (z ** 2 + math.log(2 * math.pi))).flatten(1).sum(1) for z in zs)


def bits_per_dim(nll: torch.Tensor, dims: int) -> torch.Tensor:
    """-log p(x~) (nats, per image, x~ in [0, 1)^D) -> bits per dimension of the 8-bit pixels:
    (-log p(x~) + D log 256) / (D log 2), the density of x + u on [0, 256)^D being p(x~) / 256^D."""
    return (nll + dims * math.log(256)) / (dims * math.log(2))


def dequantize(x, generator=None):
    """x~ = (x + u) / 256, u ~ U[0, 1): pixel values 0..255 (floats) -> [0, 1)."""
    return (x + torch.rand(x.shape, device=x.device, generator=generator)) / 256


@torch.no_grad()
def evaluate_bpd(model: RealNVP, images: torch.Tensor, batch: int = 500, seed: int = 0, should_stop=None,
             progress=None) -> float | None:
    """Bits/dim averaged over ``images`` (uint8 N x C x H x W), one seeded dequantization per image, the
    model in eval mode (running averages). None if ``should_stop()``."""
    device = next(model.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    dims, total, t0 = math.prod(images.shape[1:]), 0.0, time.time()
    with common.eval_mode(model):
        for i in range(0, len(images), batch):
            if should_stop is not None and should_stop():
                return None
            zs, logdet = model(dequantize(images[i:i + batch].to(device).float(), g))
            total += bits_per_dim(-(log_prior(zs) + logdet), dims).sum().item()
            if progress:
                progress(min(i + batch, len(images)), len(images), time.time() - t0)
    return total / len(images)


@torch.no_grad()
def anomaly_scores(model: RealNVP, images: torch.Tensor, cfg: Config, batch: int = 500) -> dict[str, torch.Tensor]:
    """Bits/dim of each uint8 image, higher = more anomalous, and the same minus the image's PNG code length in bits
    per dimension (Serra et al. 2020, arXiv:1909.11480: raw likelihood ranks simple images as normal). Image i's
    dequantization comes from a generator seeded by (--seed, i) and the batch norms use their running averages: its
    score does not depend on the other images."""
    import io
    from PIL import Image
    device, dims = next(model.parameters()).device, math.prod(images.shape[1:])
    u = torch.stack([torch.rand(images.shape[1:], generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + i))
                     for i in range(len(images))])
    bpd = []
    with common.eval_mode(model):
        for i in range(0, len(images), batch):
            zs, logdet = model(((images[i:i + batch].float() + u[i:i + batch]) / 256).to(device))
            bpd.append(bits_per_dim(-(log_prior(zs) + logdet), dims).cpu())
    png = []
    for image in images.permute(0, 2, 3, 1).numpy():
        f = io.BytesIO()
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(f, format="PNG", compress_level=9)
        png.append(8 * f.tell() / dims)
    bpd = torch.cat(bpd)
    return {"bpd": bpd, "bpd_minus_png": bpd - torch.tensor(png)}


@torch.no_grad()
def recalibrate(model: RealNVP, images: torch.Tensor, batches: int, batch_size: int, seed: int = 0) -> None:
    """Replace every batch norm's running averages by the mean statistics of ``batches`` training minibatches
    (uint8 images drawn with a seeded generator, dequantized once): the model's test-time batch norm without
    the noise of a momentum-0.1 average. The weights are untouched; the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, (BatchNorm, nn.BatchNorm2d))]   # the flow's, s and t's
    sums = {m: [0.0, 0.0] for m in norms}

    def record(m, inputs, output):   # the minibatch's statistics as each keeps them (nn.BatchNorm2d: unbiased var)
        sums[m][0] += inputs[0].mean(dim=(0, 2, 3))
        sums[m][1] += inputs[0].var(dim=(0, 2, 3), unbiased=isinstance(m, nn.BatchNorm2d))

    hooks = [m.register_forward_hook(record) for m in norms]
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(batches):
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)].float()
        model(dequantize(x, g).to(device))
    model.eval()
    for m, hook in zip(norms, hooks):
        hook.remove()
        m.running_mean.copy_(sums[m][0] / batches)
        m.running_var.copy_(sums[m][1] / batches)
        if isinstance(m, nn.BatchNorm2d):
            m.num_batches_tracked.fill_(batches)   # as PyTorch's cumulative average counts them


# ----------------------------------------------------------------------------------------------
# Training: maximum likelihood (section 3.1), Adam, L2 on the weight scales
# ----------------------------------------------------------------------------------------------
def weight_scales(model: nn.Module) -> list[nn.Parameter]:
    """The parameters the paper's L2 penalty covers: every weight-norm g and every coupling's tanh scale."""
    return [m.g for m in model.modules() if isinstance(m, WNConv2d)] + \
           [m.scale for m in model.modules() if isinstance(m, Coupling)]


def train_step(model, opt, x, scales: list, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict:
    """One gradient step on a batch x of pixel values (floats 0..255); ``scales``: weight_scales(model)."""
    if cfg.hflip:
        flip = torch.rand(len(x), device=x.device) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        zs, logdet = model(dequantize(x))
    nll = -(log_prior(zs) + logdet)                                    # -log p(x~), nats per image
    l2 = cfg.l2 * torch.stack(torch._foreach_norm(scales)).pow(2).sum()   # on the weight scale parameters
    loss = nll.mean() + l2
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)   # no host sync: a tensor
    scaler.step(opt)
    scaler.update()
    return {"bpd": bits_per_dim(nll.detach(), math.prod(x.shape[1:])).mean(),
            "grad_norm": grad_norm.nan_to_num(0.0, 0.0)}   # an fp16 step the scaler skipped has an inf norm: logged 0


# ----------------------------------------------------------------------------------------------
# Sampling: z ~ N(0, T^2 I), x~ = f^-1(z)
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: RealNVP, n: int, temperature: float = 1.0, generator=None, device=None) -> torch.Tensor:
    """n images in [0, 1] (N x C x H x W), from the running averages of every batch norm (eval mode), each
    pixel k / 255 for the bin k = floor(256 x~) in which the flow's x~ in [0, 1) falls: the dequantization's
    own pixel (rounding 255 x~ would move half of bin 0's mass to pixel 1)."""
    device = device or next(model.parameters()).device
    zs = [temperature * torch.randn((n, *shape), device=device, generator=generator) for shape in model.z_shapes]
    with common.eval_mode(model):
        return (256 * model.inverse(zs)).floor().clamp(0, 255) / 255


def load(path: str, device="cpu") -> RealNVP:
    """The flow of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        model = realnvp.load("runs/realnvp-fashion-mnist/ckpt.pt")
        images = realnvp.sample(model, 16, temperature=0.7)      # in [0, 1], 16 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "realnvp")
    model = build(cfg, "cpu")
    model.load_state_dict(ckpt["models"]["model"])
    return model.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "realnvp", ddp)   # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: the flow, data, Adam with the L2 penalty on the weight scales (section 4.1) -----------------
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build(cfg, device).to(memory_format=memory_format)
    run.say(f"Real NVP ({cfg.arch}): {common.count_parameters(model):,} parameters")
    images, _ = common.training_set(cfg)            # --per-class N: the subset augment.py draws
    # --eval-every's test bits/dim; a folder has no test split: off, unless --eval-bpd was typed (then refused)
    with_bpd = cfg.eval_every and cfg.eval_bpd and (cfg.dataset != "folder" or "eval_bpd" in cfg.given)
    test = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test")[:cfg.eval_bpd] \
        if with_bpd else None
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, value_range=(0.0, 255.0), rank=ddp.rank,
                             world=ddp.world, memory_format=memory_format)   # pixel values, dequantized by train_step
    scales = weight_scales(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)   # the L2 penalty is in the loss, on ``scales`` only
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    grid = torch.Generator(device)                  # the grids' own noise, the same for every grid of the run
    saved = dict(models={"model": model}, optimizers={"model": opt}, data={"train": batches},
                 state={"scaler": scaler})          # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    flow = model                                    # grids and evaluation use the plain module, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        model = nn.parallel.DistributedDataParallel(model, device_ids=ddp.device_ids)
    if cfg.compile:
        model = torch.compile(model)
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, images, value_range=(0, 1)) if cfg.eval_every else None

    def save_samples(step: int) -> None:            # z ~ N(0, T^2 I) from the grid's noise, the flow in eval mode
        with common.eval_mode(flow):
            common.save_grid(draw(64, grid.manual_seed(cfg.seed)), run.out / "samples" / f"{step:06d}.png",
                             value_range=(0, 1))

    def draw(n: int, generator) -> torch.Tensor:    # grids and --eval-every's samples, in [0, 1] (eval mode)
        return sample(flow, n, cfg.temperature, generator, device)

    def test_bpd(should_stop) -> dict | None:       # --eval-bpd: the test bits/dim; None: off, or cut short
        bpd = evaluate_bpd(flow, test, seed=cfg.seed, should_stop=should_stop) if test is not None else None
        return None if bpd is None else {"test_bpd": bpd}

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        losses = train_step(model, opt, batches.next(), scales, cfg, amp, scaler)
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
    if ddp.rank == 0 and step > run.start_step and step % cfg.sample_every:
        save_samples(step)                          # and the last step's grid


def sample_command(cfg: Config) -> None:
    """--sample N: N images of the checkpoint's flow in --sample-out, split among processes and resumable."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "realnvp", ddp, command="--sample")
    stop = common.Stop(ddp)
    model = build(cfg, ddp.device).eval()
    common.load_models(run, model=model)
    common.write_sharded(run, lambda n, g: sample(model, n, cfg.temperature, g), cfg.sample, 500,
                         {"temperature": cfg.temperature}, stop, value_range=(0, 1))


def score_command(cfg: Config) -> None:
    """--score IMAGES: each image's anomaly scores (higher = more anomalous) in a CSV, for anomaly.py."""
    run = common.resolve_run(cfg, "realnvp", common.Processes(cfg.device, connect=False), command="--score")
    model = build(cfg, run.ddp.device)
    common.load_models(run, model=model)
    images, labels = common.score_images(cfg, cfg.score)
    common.write_scores(run, anomaly_scores(model, images, cfg), labels)


def bpd_command(cfg: Config) -> None:
    """--bpd N: bits/dim of the checkpoint on the first N test images, with the running averages as saved, then
    (--recalibrate M) with every batch norm's running averages from M training minibatches."""
    run = common.resolve_run(cfg, "realnvp", common.Processes(cfg.device, connect=False), command="--bpd")
    model = build(cfg, run.ddp.device)
    common.load_models(run, model=model)
    test = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test")[:cfg.bpd]
    progress = lambda i, n, s: print(   # noqa: E731
        f"bits/dim: {i}/{n} test images | {common.duration(s)} | ETA {common.duration(s * (n - i) / i)}", flush=True)
    bpd = evaluate_bpd(model, test, seed=cfg.seed, progress=progress)
    print(f"test_bpd: {bpd:.4f}  (bits/dim on {len(test)} test images, running averages as saved)")
    if cfg.recalibrate:
        recalibrate(model, common.training_set(cfg)[0], cfg.recalibrate, cfg.batch_size, seed=cfg.seed)
        bpd = evaluate_bpd(model, test, seed=cfg.seed, progress=progress)
        print(f"test_bpd_recalibrated: {bpd:.4f}  (the same, running averages from {cfg.recalibrate} "
              f"training minibatches of {cfg.batch_size})")


def main():
    cfg = common.parse_config(Config)
    command = bpd_command if cfg.bpd else score_command if cfg.score else sample_command if cfg.sample else train
    command(cfg)


if __name__ == "__main__":
    common.run_main(main)
