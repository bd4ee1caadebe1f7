"""Auto-Encoding Variational Bayes.

Diederik P. Kingma, Max Welling. ICLR 2014. arXiv:1312.6114. Results and every command: docs/vae.md

A latent-variable model p_theta(x, z) = p(z) p_theta(x | z), p(z) = N(0, I), learned together with a
recognition model (the encoder) q_phi(z | x) = N(mu(x), diag sigma^2(x)) by maximizing, for every
datapoint, the variational lower bound on its log-likelihood (eq. 1, 3):

    log p_theta(x) >= L(theta, phi; x) = -KL(q_phi(z | x) || p(z)) + E_q[log p_theta(x | z)]
with the KL in closed form for two Gaussians (appendix B):
    -KL = 1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)
and the expectation estimated by the reparameterization trick (section 2.4), z = mu + sigma * eps,
eps ~ N(0, I), with L = 1 sample per datapoint (eq. 10, section 5).

Algorithm 1 (AEVB, minibatch version), our train_step:
    X^M <- random minibatch of M = 100 datapoints
    eps <- random samples from N(0, I)
    g   <- gradient of the minibatch estimator (eq. 8) w.r.t. theta and phi
    theta, phi <- update with g (Adagrad)

The paper's MNIST setup (section 5, appendix C), all defaults: MLP encoder and decoder with one hidden
layer of 500 tanh units (appendix C.2: h = tanh(W3 x + b3), mu = W4 h + b4, log sigma^2 = W5 h + b5;
C.1: y = sigmoid(W2 tanh(W1 z + b1) + b2), log p(x | z) = sum_i x_i log y_i + (1 - x_i) log(1 - y_i)),
z of dimension 20, minibatch M = 100, L = 1, every parameter initialised from N(0, 0.01), Adagrad with a
global step size from the paper's grid {0.01, 0.02, 0.1}, and "a small weight decay term corresponding to
a prior p(theta) = N(0, I)": 815,824 parameters for 28 x 28 images (tested).

Evaluation on the test set, in nats per image (--nll N; --eval-every with --eval-nll N): the negative ELBO
(its KL in closed form, E_q[log p(x | z)] over k samples), and -L_k, the importance-weighted bound of Burda,
Grosse, Salakhutdinov 2015 (IWAE, arXiv:1509.00519, section 3, Theorem 1), with z_1..z_k ~ q(z | x):
    log p(x) >= L_k = E[log 1/k sum_i p(x, z_i) / q(z_i | x)],  L_1 = ELBO <= L_k <= L_{k+1} -> log p(x),
in log space, k = 5000 (theirs). Logged as test_nll: an upper bound on -log p(x) in expectation (one
estimate may fall on either side), tight as k -> infinity.

Likelihoods p(x | z) (--likelihood), on images in [0, 1]:
- bernoulli (default; C.1): grey levels binarized as the papers that report MNIST likelihoods do, each
  training image afresh at every step, x ~ Bernoulli(pixel / 255) (from torch's generator: resume is
  exact), and the test set once with TEST_SEED, whatever --seed is. The NLL is that of these binary images.
- gaussian (C.2, the Frey Face decoder: sigmoid means, a log-variance per pixel) on dequantized pixels
  x = (pixel + u) / 256, u ~ U[0, 1) (the test set once, with TEST_SEED): -log p(x) + D log 256 bounds the
  NLL of the 8-bit images (Theis et al. 2016, arXiv:1511.01844).
- logistic: a discretized logistic on the 256 pixel values (IAF, Kingma et al. 2016, arXiv:1606.04934: the
  decoder gives the mean, one log-scale is shared by all pixels), the edge bins stretched to -inf and +inf as
  in PixelCNN++ (arXiv:1701.05517) so that the 256 probabilities sum to 1 (tested). Bits/dim: nats / (D ln 2).
--arch conv, ours, for RGB at 16, 28, 32, 64: stride-2 convolutions with ReLU to a 4 x 4 (7 x 7 at 28) map,
a linear layer to (mu, log sigma^2), and the mirror image in the decoder; use it with --likelihood logistic.

Deviations, each deliberate:
- The loss is the minibatch mean of -L plus -log p(theta) / N (Adagrad's weight decay 1 / N, N training
  images): eq. 8 divided by N, the same MAP objective; Adagrad's steps do not change with a constant scale.
- The prior N(0, I) covers the weight matrices, not the biases, as in the first author's code (dpkingma/nips14-ssl,
  anglepy VAE_Z_X: logpv and logpw); the paper says only "a prior p(theta)".
- The Adagrad step size 0.02 is our pick from the paper's grid (it does not say which it used for MNIST);
  PyTorch's Adagrad starts its accumulator at 0 and adds eps = 1e-10.
- log p(x | z) is computed from the decoder's logits l as x l - softplus(l): x log y + (1 - x) log(1 - y)
  without its overflow.
- --arch conv keeps PyTorch's default initialisation (N(0, 0.01) through eight layers would shrink the signal
  a thousandfold); the paper has no convolutional model.
- The course notes write z = mu + eps sigma^2; the paper's reparameterization is z = mu + sigma * eps.
- --sample and the grids show the mean of p(x | z) (Bernoulli: the pixel probabilities y), not a draw from it,
  which only adds salt-and-pepper noise: the means are what the paper's figures show and what FID compares.

Usage (every command, the results and the speed: docs/vae.md):
    python vae.py                                     # Fashion-MNIST, dynamically binarized, the paper's MLP
    python vae.py --resume                            # continue runs/vae-fashion-mnist (a requeued job too)
    sbatch submit.sh vae                              # on SLURM, requeued until done (GPUS=4: torchrun, DDP)
    python vae.py --nll 10000                         # test -ELBO and IWAE's -L_5000 >= -log p(x), in nats
    python vae.py --sample 10000 --sample-out vae.npz --figures   # images + reconstructions, interpolation
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

TEST_SEED = 0   # the one binarization (or dequantization) of the test set, whatever --seed is


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(1_000_000, "optimizer steps (Figure 2 runs to 10^8 training samples: 10^6 steps of M = 100)",
                     run=True, min=0)
    nll: int = arg(0, "no training: the test negative ELBO and IWAE's -L_k (a bound on -log p(x)), in nats, on the "
                   "first N test images",
                   command=True, min=0)
    eval_nll: int = arg(1000, "with --eval-every: the same on the first N test images, to metrics.csv (test_neg_elbo, "
                        "test_nll); 0: off", run=True, min=0)
    k: int = arg(5000, "importance samples of IWAE's -L_k, a bound on -log p(x) (Burda et al. 2015: 5000)", run=True,
                 min=1)
    figures: bool = arg(False, "with --sample: also write reconstructions.png, interpolation.png and, when --nz is 2, "
                        "manifold.png (Figure 4) to --out", sampling=True)
    score: str = arg("", "no training: anomaly scores of IMAGES (train, test, validation or an .npz), higher = more "
                     "anomalous, to --score-out", command=True, metavar="IMAGES")
    score_out: str = arg("", "the CSV of --score (default: <out>/scores-<IMAGES>.csv)", command=True, metavar="PATH")
    class_: int = arg(-1, "with --sample of a --conditional model: this class only (-1: N/K of each)", sampling=True,
                      min=-1, flag="--class")
    conditional: bool = arg(False, "the generative model M2 of Kingma, Rezende, Mohamed, Welling 2014 "
                            "(arXiv:1406.5298): q(z | x, y) and p(x | y, z) given the one-hot class y")
    # The paper's hyper-parameters (section 5, appendix C)
    arch: str = arg("mlp", "mlp (appendix C: one hidden layer) | conv (ours: stride-2 convolutions, for RGB)",
                    choices=("mlp", "conv"))
    likelihood: str = arg("bernoulli", "p(x | z): bernoulli (appendix C.1, binarized images) | gaussian (C.2, "
                          "dequantized pixels) | logistic (discretized, 256 values)",
                          choices=("bernoulli", "gaussian", "logistic"))
    image_size: int = arg(0, "0: the dataset's own (28 MNIST, 32 CIFAR-10); --arch conv: 28 or a power of two >= 16",
                          min=0)
    hidden: int = arg(500, "--arch mlp: hidden units of the encoder and of the decoder (section 5: 500 for MNIST)",
                      min=1)
    nf: int = arg(64, "--arch conv: channels of the first convolution, doubled at each stride-2 block", min=1)
    nz: int = arg(20, "dimension of z (Figure 2 sweeps 3 to 200; 2 for the manifold of Figure 4)", min=1)
    batch_size: int = arg(100, "minibatch size M (section 5)", min=1)
    lr: float = arg(0.02, "Adagrad's global step size, from the paper's grid {0.01, 0.02, 0.1}", above=0)
    prior_precision: float = arg(1.0, "the prior p(theta) = N(0, I / precision) on the weights, as a weight decay "
                                 "precision / N (section 5: N(0, I)); 0: none", min=0)
    init_std: float = arg(0.01, "--arch mlp: every parameter from N(0, init_std^2) (section 5: N(0, 0.01))", above=0)
    channels_last: bool = arg(False, "--arch conv: NHWC memory layout for the convolutions (faster with --amp)",
                              run=True)


# ----------------------------------------------------------------------------------------------
# Networks: q_phi(z | x) and p_theta(x | z)
# ----------------------------------------------------------------------------------------------
PARAMS_PER_PIXEL = {"bernoulli": 1, "gaussian": 2, "logistic": 1}   # decoder outputs per pixel value


def joined(h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """[h, y]: a layer's input with the one-hot class y of M2 beside it (h alone without a class)."""
    return h if y is None else torch.cat([h, y.to(h.dtype)], dim=1)


class MLPEncoder(nn.Module):
    """q_phi(z | x), the Gaussian MLP of appendix C.2: h = tanh(W3 x + b3), mu = W4 h + b4,
    log sigma^2 = W5 h + b5 (W4 and W5 as one matrix product)."""

    def __init__(self, D: int, hidden: int, nz: int, classes: int = 0):
        super().__init__()
        self.hidden = nn.Linear(D + classes, hidden)   # W3, b3 (M2: of [x, y])
        self.out = nn.Linear(hidden, 2 * nz)           # [W4; W5], [b4; b5]

    def forward(self, x, y=None):
        h = torch.tanh(self.hidden(joined(x.flatten(1), y)))      # B x hidden
        mu, logvar = self.out(h).chunk(2, dim=1)                  # B x nz each
        return mu, logvar


class MLPDecoder(nn.Module):
    """p_theta(x | z), appendix C.1: the parameters W2 tanh(W1 z + b1) + b2 of p(x | z) for each pixel
    (for Bernoulli, the logits of y)."""

    def __init__(self, nz: int, hidden: int, shape: tuple, per_pixel: int, classes: int = 0):
        super().__init__()
        self.shape = (per_pixel * shape[0], *shape[1:])
        self.hidden = nn.Linear(nz + classes, hidden)            # W1, b1 (M2: of [z, y])
        self.out = nn.Linear(hidden, math.prod(self.shape))      # W2, b2

    def forward(self, z, y=None):
        h = torch.tanh(self.hidden(joined(z, y)))                # B x hidden
        return self.out(h).view(-1, *self.shape)                 # B x (per_pixel C) x H x W


def ladder(image_size: int) -> tuple[int, int]:
    """(smallest feature map, number of stride-2 blocks) of --arch conv: 28 -> 14 -> 7, or 2^n -> ... -> 4."""
    base = 7 if image_size == 28 else 4
    n = math.log2(image_size / base)
    if n < 1 or n != int(n):
        raise common.UserError(f"--image-size {image_size} is not supported by --arch conv: use 28 or a power of "
                               f"two >= 16 (or --arch mlp, which takes any size)")
    return base, int(n)


class ConvEncoder(nn.Module):
    """q_phi(z | x) through stride-2 convolutions (DCGAN's discriminator ladder, ReLU, no batch norm). At 64 x 64
    RGB, nf 64:  3 x 64 x 64 -> 64 x 32 x 32 -> 128 x 16 x 16 -> 256 x 8 x 8 -> 512 x 4 x 4 -> 2 nz"""

    def __init__(self, channels: int, image_size: int, nf: int, nz: int, classes: int = 0):
        super().__init__()
        base, n = ladder(image_size)
        layers, ch = [], channels
        for i in range(n):
            layers += [nn.Conv2d(ch, nf * 2 ** i, 4, 2, 1), nn.ReLU(True)]     # nf 2^i x H/2 x W/2
            ch = nf * 2 ** i
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(ch * base * base + classes, 2 * nz)             # mu and log sigma^2 (M2: and y)

    def forward(self, x, y=None):
        mu, logvar = self.out(joined(self.net(x).flatten(1), y)).chunk(2, dim=1)   # B x nz each
        return mu, logvar


class ConvDecoder(nn.Module):
    """p_theta(x | z), the encoder's mirror image. At 64 x 64 RGB, nf 64 (logistic: 3 output channels):
        z -> 512 x 4 x 4 -> 256 x 8 x 8 -> 128 x 16 x 16 -> 64 x 32 x 32 -> 3 x 64 x 64"""

    def __init__(self, nz: int, channels: int, image_size: int, nf: int, per_pixel: int, classes: int = 0):
        super().__init__()
        self.base, n = ladder(image_size)
        self.ch = nf * 2 ** (n - 1)
        self.inp = nn.Linear(nz + classes, self.ch * self.base * self.base)
        layers, ch = [], self.ch
        for _ in range(n - 1):
            layers += [nn.ReLU(True), nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1)]  # ch/2 x 2H x 2W
            ch //= 2
        layers += [nn.ReLU(True), nn.ConvTranspose2d(ch, per_pixel * channels, 4, 2, 1)]   # per_pixel C x size x size
        self.net = nn.Sequential(*layers)

    def forward(self, z, y=None):
        return self.net(self.inp(joined(z, y)).view(-1, self.ch, self.base, self.base))


class VAE(nn.Module):
    """The encoder q_phi(z | x), the decoder p_theta(x | z) and its likelihood; ``forward`` gives the two terms of
    the bound for one reparameterized sample per image. With ``classes`` K (--conditional, M2): q_phi(z | x, y) and
    p_theta(x | y, z), each given the class y (a tensor of class indices) one-hot beside its input."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, nz: int, likelihood: str, classes: int = 0):
        super().__init__()
        self.encoder, self.decoder, self.nz, self.likelihood = encoder, decoder, nz, likelihood
        self.classes = classes
        if likelihood == "logistic":
            self.log_scale = nn.Parameter(torch.zeros(()))     # log s of the logistic, shared by all pixels (IAF)

    def one_hot(self, y):
        return None if y is None else F.one_hot(y, self.classes)

    def encode(self, x, y=None):
        """(mu, log sigma^2) of q_phi(z | x) (or q_phi(z | x, y)), B x nz each."""
        return self.encoder(x, self.one_hot(y))

    def decode(self, z, y=None):
        """The parameters of p_theta(x | z) (or p_theta(x | y, z)): B x (per_pixel C) x H x W."""
        return self.decoder(z, self.one_hot(y))

    def forward(self, x, y=None):
        """(log p(x | z), KL(q(z | x) || p(z))) of each image, z = mu + sigma * eps: the two terms of eq. 10, L = 1
        (M2: log p(x | y, z) and KL(q(z | x, y) || p(z)), the bound on log p(x | y))."""
        mu, logvar = self.encode(x, y)
        mu, logvar = mu.float(), logvar.float()                           # eps and z in float32 under --amp too
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, device=mu.device)   # the reparameterization trick
        return self.log_px(x, self.decode(z, y)), kl_divergence(mu, logvar)

    def log_px(self, x, out):
        """log p_theta(x | z) of each image (summed over its pixels), in nats. ``out`` may carry extra leading
        dimensions (k samples of z per image): x broadcasts against them."""
        out = out.float()
        C = x.shape[-3]
        if self.likelihood == "bernoulli":
            # x log y + (1 - x) log(1 - y), y = sigmoid(l)  ==  x l - softplus(l)   (appendix C.1)
            log_p = x * out - F.softplus(out)
        elif self.likelihood == "gaussian":
            # log N(x; m, e^v), m = sigmoid(.)   (appendix C.2), and the 1/256 width of a pixel's bin
            mean, logvar = torch.sigmoid(out[..., :C, :, :]), out[..., C:, :, :]
            log_p = -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar)) - math.log(256)
        else:
            log_p = discretized_logistic_log_prob(x, out, self.log_scale.float())
        return log_p.sum((-3, -2, -1))

    def mean(self, out):
        """The mean of p_theta(x | z), an image in [0, 1] (Bernoulli: the pixel probabilities y)."""
        if self.likelihood == "bernoulli":
            return torch.sigmoid(out.float())
        if self.likelihood == "gaussian":
            return torch.sigmoid(out[:, :out.shape[1] // 2].float())
        return out.float().clamp(0, 1)


def init_weights(module: nn.Module, std: float) -> None:
    """Section 5: "All parameters ... were initialized by random sampling from N(0, 0.01)", biases included; 0.01
    read as the standard deviation, as van Amersfoort's reproduction does (y0ast/Variational-Autoencoder)."""
    for p in module.parameters():
        nn.init.normal_(p, 0.0, std)


def image_size(cfg: Config) -> int:
    return cfg.image_size or common.DATASETS.get(cfg.dataset, (3, 64))[1]


def classes_of(cfg: Config) -> int:
    """K of --conditional (0 without it): the dataset's classes."""
    if cfg.conditional and cfg.dataset not in common.CLASSES:
        raise common.UserError(f"--conditional: --dataset {cfg.dataset} has no labels; use a labelled dataset "
                               f"({', '.join(common.CLASSES)})")
    return common.CLASSES[cfg.dataset] if cfg.conditional else 0


def build(cfg: Config, device) -> VAE:
    C, S, K = common.dataset_channels(cfg.dataset), image_size(cfg), classes_of(cfg)
    per_pixel = PARAMS_PER_PIXEL[cfg.likelihood]
    if cfg.arch == "mlp":
        model = VAE(MLPEncoder(C * S * S, cfg.hidden, cfg.nz, K), MLPDecoder(cfg.nz, cfg.hidden, (C, S, S), per_pixel,
                                                                             K), cfg.nz, cfg.likelihood, K)
        init_weights(model, cfg.init_std)
    else:
        model = VAE(ConvEncoder(C, S, cfg.nf, cfg.nz, K), ConvDecoder(cfg.nz, C, S, cfg.nf, per_pixel, K), cfg.nz,
                    cfg.likelihood, K)
    return model.to(device)


# ----------------------------------------------------------------------------------------------
# The bound: KL in closed form, the likelihoods, and the importance-weighted estimate of log p(x)
# ----------------------------------------------------------------------------------------------
def kl_divergence(mu, logvar):
    """KL(N(mu, diag sigma^2) || N(0, I)) of each row, appendix B:
    -1/2 sum_j (1 + log sigma_j^2 - mu_j^2 - sigma_j^2)."""
    return -0.5 * (1 + logvar - mu ** 2 - torch.exp(logvar)).sum(-1)


def discretized_logistic_log_prob(x, mean, log_scale):
    """log P(x) of a pixel value x = k / 255 under a logistic (mean, s = e^log_scale) integrated over x's bin
    [x - 1/510, x + 1/510], the first bin stretched to -inf and the last to +inf. With a = (x + 1/510 - mean) / s
    and b = (x - 1/510 - mean) / s, P = sigmoid(a) - sigmoid(b), whose log is, without cancellation,
    log sigmoid(a) - softplus(b) + log(1 - e^(b - a))."""
    inv_s = torch.exp(-log_scale)
    a = (x - mean + 1 / 510) * inv_s
    b = (x - mean - 1 / 510) * inv_s
    mid = F.logsigmoid(a) - F.softplus(b) + torch.log(-torch.expm1(b - a))
    return torch.where(x < 0.5 / 255, F.logsigmoid(a), torch.where(x > 1 - 0.5 / 255, F.logsigmoid(-b), mid))


def observe(x, likelihood: str, generator=None):
    """What p(x | z) models, from images in [0, 1] (pixel / 255). bernoulli: a binary image drawn from
    Bernoulli(pixel / 255), afresh at each call (dynamic binarization); gaussian: the dequantized pixels
    (pixel + u) / 256, u ~ U[0, 1); logistic: the pixel values themselves."""
    if likelihood == "bernoulli":
        return torch.bernoulli(x, generator=generator)
    if likelihood == "gaussian":
        return ((x * 255).round() + torch.rand(x.shape, device=x.device, generator=generator)) / 256
    return x


def test_images(cfg: Config, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images as the model sees them, observed once with TEST_SEED (on the CPU: the same
    binary images on every machine), and their labels."""
    images, labels = common.load_images(cfg.dataset, cfg.data_root, image_size(cfg), split="test", labels=True)
    return observe(images[:n].float() / 255, cfg.likelihood, torch.Generator().manual_seed(TEST_SEED)), labels[:n]


@torch.no_grad()
def bounds(model: VAE, x, k: int, generator=None, values: int = 2 ** 24, y=None):
    """(negative ELBO, IWAE's -L_k) of each image of x, in nats: two bounds on -log p(x) (M2, given the classes y:
    on -log p(x | y)), -L_k the tighter (in expectation). With z_i = mu + sigma eps_i,
    i = 1..k, and log w_i = log p(x | z_i) + log p(z_i) - log q(z_i | x):
        -L_k = -log 1/k sum_i w_i = -(logsumexp_i log w_i - log k)    (IWAE, section 3)
        -ELBO = KL(q || p(z)) - 1/k sum_i log p(x | z_i)               (eq. 10, averaged over the k samples)
    The k samples go through the decoder about ``values`` pixel values at a time (memory bounded at any size)."""
    mu, logvar = model.encode(x, y)                                        # B x nz
    sigma = torch.exp(0.5 * logvar)
    chunk = max(1, values // x.numel())
    log_w, sum_log_px = [], 0.0
    for i in range(0, k, chunk):
        eps = torch.randn((min(chunk, k - i), *mu.shape), device=mu.device, generator=generator)   # n x B x nz
        z = mu + sigma * eps
        ys = None if y is None else y.repeat(len(eps))                                              # n B labels
        log_px = model.log_px(x, model.decode(z.flatten(0, 1), ys).unflatten(0, eps.shape[:2]))      # n x B
        log_pz = -0.5 * (z ** 2 + math.log(2 * math.pi)).sum(-1)
        log_qz = -0.5 * (eps ** 2 + math.log(2 * math.pi) + logvar).sum(-1)
        log_w.append(log_px + log_pz - log_qz)
        sum_log_px = sum_log_px + log_px.sum(0)
    iwae = torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)
    elbo = sum_log_px / k - kl_divergence(mu, logvar)
    return -elbo, -iwae


@torch.no_grad()
def test_nll(model: VAE, x, k: int, batch: int = 100, seed: int = 0, should_stop=None, progress=None, y=None):
    """{"test_neg_elbo", "test_nll"}: the means of ``bounds`` over the observed test images x (M2: given their
    classes y), in nats per image; None if ``should_stop()`` cut it short. The same seed gives the same samples
    (comparable across steps)."""
    g = torch.Generator(x.device).manual_seed(seed)
    neg_elbo, nll, t0 = 0.0, 0.0, time.time()
    for i in range(0, len(x), batch):
        if should_stop is not None and should_stop():
            return None
        a, b = bounds(model, x[i:i + batch], k, g, y=None if y is None else y[i:i + batch])
        neg_elbo, nll = neg_elbo + a.sum().item(), nll + b.sum().item()
        if progress:
            progress(min(i + batch, len(x)), len(x), time.time() - t0)
    return {"test_neg_elbo": neg_elbo / len(x), "test_nll": nll / len(x)}


@torch.no_grad()
def class_nll(model: VAE, x, k: int, seed: int = 0, batch: int = 100) -> torch.Tensor:
    """M2 as a classifier: IWAE's -L_k of -log p(x | y) for every class y, B x K (with a uniform p(y), the most
    probable class is the argmin). The same noise for every class."""
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        out.append(torch.stack([bounds(model, xb, k, torch.Generator(x.device).manual_seed(seed),
                                       y=torch.full((len(xb),), c, device=x.device))[1]
                                for c in range(model.classes)], dim=1))
    return torch.cat(out)


@torch.no_grad()
def anomaly_scores(model: VAE, images: torch.Tensor, cfg: Config) -> dict[str, torch.Tensor]:
    """-ELBO and IWAE's -L_k of each uint8 image, higher = more anomalous. Image i is observed (binarized) and its
    k samples of z drawn with generators seeded by (--seed, i): its score does not depend on the other images."""
    device, out = next(model.parameters()).device, torch.empty(2, len(images))
    for i, image in enumerate(images):
        seed = cfg.seed * 1_000_003 + i
        x = observe(image[None].float() / 255, cfg.likelihood, torch.Generator().manual_seed(seed)).to(device)
        out[:, i] = torch.cat(bounds(model, x, cfg.k, torch.Generator(device).manual_seed(seed))).cpu()
    return {"neg_elbo": out[0], "iwae": out[1]}


# ----------------------------------------------------------------------------------------------
# Training: Algorithm 1
# ----------------------------------------------------------------------------------------------
def train_step(model, opt, x, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False), y=None) -> dict[str, torch.Tensor]:
    """One update of Algorithm 1 on a minibatch x of images in [0, 1] (M2: of classes y, the bound on log p(x | y))."""
    # X^M <- the minibatch, as p(x | z) sees it: a fresh binarization (or dequantization) at every step
    x = observe(x, cfg.likelihood)
    # eps ~ N(0, I) (inside the model) and the minibatch estimator of the bound (eq. 8, 10)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        log_px, kl = model(x, y)
    neg_elbo = (kl - log_px).mean()
    # g <- its gradient; theta, phi <- Adagrad step (the prior p(theta) is the optimizer's weight decay)
    opt.zero_grad(set_to_none=True)
    scaler.scale(neg_elbo).backward()
    scaler.step(opt)
    scaler.update()
    return {"neg_elbo": neg_elbo.detach(), "kl": kl.mean().detach()}


def make_optimizer(model: nn.Module, cfg: Config, n_train: int, device) -> torch.optim.Adagrad:
    """Adagrad on -ELBO + prior: the weight matrices (not the biases, as in the authors' code) decay by
    precision / N, the gradient of -log p(theta) / N for p(theta) = N(0, I / precision)."""
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    return torch.optim.Adagrad([{"params": weights, "weight_decay": cfg.prior_precision / n_train},
                                {"params": others, "weight_decay": 0.0}], lr=cfg.lr,
                               fused=device.type == "cpu")   # PyTorch's fused Adagrad is CPU-only


# ----------------------------------------------------------------------------------------------
# Sampling and figures
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def sample(model: VAE, n: int, generator=None, y=None) -> torch.Tensor:
    """n images: z ~ p(z) = N(0, I), then the mean of p(x | z) (M2: of p(x | y, z), y the n classes), in [0, 1]."""
    z = torch.randn(n, model.nz, device=next(model.parameters()).device, generator=generator)
    return model.mean(model.decode(z, y))


@torch.no_grad()
def reconstructions(model: VAE, x, rows: int = 4, per_row: int = 10) -> torch.Tensor:
    """Pairs of rows: test images as the model sees them, then the means of p(x | z = mu(x))."""
    per_row = min(per_row, len(x))
    rows = min(rows, len(x) // per_row)
    x = x[:rows * per_row]
    recon = model.mean(model.decode(model.encode(x)[0]))
    return torch.stack([x.view(rows, per_row, *x.shape[1:]), recon.view(rows, per_row, *x.shape[1:])], 1).flatten(0, 2)


@torch.no_grad()
def interpolation(model: VAE, x, rows: int = 8, steps: int = 10) -> torch.Tensor:
    """Each row: test image a, the means decoded along z_a + t (z_b - z_a), t in [0, 1], from the posterior mean
    of a to that of b, then image b."""
    mu = model.encode(x[:2 * rows])[0]
    z_a, z_b = mu[:rows], mu[rows:]
    t = torch.linspace(0, 1, steps, device=mu.device).view(1, steps, 1)
    walk = model.mean(model.decode((z_a[:, None] + t * (z_b - z_a)[:, None]).flatten(0, 1))).unflatten(0, (rows, steps))
    return torch.cat([x[:rows, None], walk, x[rows:2 * rows, None]], dim=1).flatten(0, 1)


@torch.no_grad()
def manifold(model: VAE, n: int = 20) -> torch.Tensor:
    """Figure 4: with z in 2-D, "linearly spaced coordinates on the unit square ... transformed through the inverse
    CDF of the Gaussian", here the centres (i + 1/2) / n of an n x n grid; each decoded to its mean."""
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    coords = torch.distributions.Normal(0.0, 1.0).icdf(u).float()
    z = torch.stack(torch.meshgrid(coords.flip(0), coords, indexing="ij"), dim=-1).view(n * n, 2)
    return model.mean(model.decode(z.to(next(model.parameters()).device)))


def write_figures(model: VAE, cfg: Config, out, device) -> None:
    """--figures: reconstructions.png, interpolation.png and (nz = 2) manifold.png in ``out``."""
    model.eval()
    try:
        x = test_images(cfg, 40)[0].to(device)
    except common.UserError:   # --dataset folder has no test split: its first training images
        x = observe(common.load_images(cfg.dataset, cfg.data_root, image_size(cfg))[:40].float().to(device) / 255,
                    cfg.likelihood, torch.Generator(device).manual_seed(TEST_SEED))
    out.mkdir(parents=True, exist_ok=True)
    figures = {"reconstructions.png": (reconstructions(model, x), 10),
               "interpolation.png": (interpolation(model, x, rows=min(8, len(x) // 2)), 12)}
    if model.nz == 2:
        figures["manifold.png"] = (manifold(model), 20)
    for name, (images, nrow) in figures.items():
        common.save_grid(images, out / name, nrow=nrow, value_range=(0, 1))
        print(f"wrote {out / name}")


def load(path: str, device="cpu") -> VAE:
    """The VAE of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        model = vae.load("runs/vae-fashion-mnist/ckpt.pt")
        images = vae.sample(model, 64)                   # means of p(x | z), in [0, 1], 64 x C x H x W
        mu, logvar = model.encode(x)                     # q(z | x) of images x in [0, 1]
    """
    cfg, ckpt = common.load_config(Config, path, "vae")
    model = build(cfg, "cpu")
    model.load_state_dict(ckpt["models"]["vae"])
    return model.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "vae", ddp)       # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: the model, data, optimizer (section 5, appendix C) -----------------------------------------
    model = build(cfg, device)
    if cfg.arch == "conv" and cfg.likelihood == "bernoulli" and common.dataset_channels(cfg.dataset) == 3:
        common.warn("--arch conv on colour images with --likelihood bernoulli models their binarized channels; "
                    "--likelihood logistic models the 8-bit image")
    run.say(f"VAE ({cfg.arch}, {cfg.likelihood}): encoder {common.count_parameters(model.encoder):,} + decoder "
            f"{common.count_parameters(model.decoder):,} = {common.count_parameters(model):,} parameters")
    images, labels = common.training_set(cfg)      # --per-class N: the subset augment.py draws
    try:
        test, test_y = [t.to(device) for t in test_images(cfg, cfg.eval_nll)] if cfg.eval_every and cfg.eval_nll \
            else (None, None)
    except common.UserError as e:   # --dataset folder: no test split
        raise common.UserError(f"{e}, or --eval-nll 0 (FID alone)") from None
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, value_range=(0.0, 1.0), rank=ddp.rank,
                             world=ddp.world, memory_format=memory_format, labels=labels if model.classes else None)
    model = model.to(memory_format=memory_format)
    opt = make_optimizer(model, cfg, len(images), device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    classes = model.classes                         # M2: a grid row of 8 per class
    fixed_y = torch.arange(classes, device=device).repeat_interleave(8) if classes else None
    fixed_z = torch.randn(64 if fixed_y is None else len(fixed_y), cfg.nz, device=device)   # the same for every grid
    saved = dict(models={"vae": model}, optimizers={"vae": opt}, data={"train": batches},
                 state={"fixed_z": fixed_z, "scaler": scaler})   # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    vae = model                                     # grids and evaluation use the plain module, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        model = nn.parallel.DistributedDataParallel(model, device_ids=ddp.device_ids)
    if cfg.compile:
        model = torch.compile(model)
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, images, value_range=(0, 1)) if cfg.eval_every else None
    extra = None if test is None else (             # --eval-nll: the test -ELBO and -L_k beside the FID
        lambda should_stop: test_nll(vae, test, cfg.k, seed=cfg.seed, should_stop=should_stop,
                                     y=test_y if classes else None))

    def save_samples(step: int) -> None:            # the fixed-z grid, in eval mode: drawing changes nothing
        with common.eval_mode(vae):
            common.save_grid(vae.mean(vae.decode(fixed_z, fixed_y)), run.out / "samples" / f"{step:06d}.png",
                             nrow=8 if classes else None, value_range=(0, 1))

    def draw(n: int, generator) -> torch.Tensor:    # --eval-every's samples (M2: classes uniform)
        with common.eval_mode(vae):
            y = torch.randint(classes, (n,), device=device, generator=generator) if classes else None
            return sample(vae, n, generator, y)

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        x, y = batches.next() if classes else (batches.next(), None)
        losses = train_step(model, opt, x, cfg, amp, scaler, y)
        step += 1
        log.add(losses)
        if step % cfg.log_every == 0:
            log.write(step)
        if step % cfg.sample_every == 0 and ddp.rank == 0:
            save_samples(step)
        best = evaluate is not None and step % cfg.eval_every == 0 and evaluate(step, draw, log, stop, extra=extra)
        if step % cfg.ckpt_every == 0 or best or (cfg.keep_every and step % cfg.keep_every == 0):
            common.save_run(run, step, log, **saved, best=best)
    common.finish(run, step, log, stop, **saved)    # the last checkpoint, then how the run ended
    if ddp.rank == 0 and step > run.start_step and step % cfg.sample_every:
        save_samples(step)                          # and the last step's grid


def sample_command(cfg: Config) -> None:
    """--sample N: N images (the means of p(x | z)) in --sample-out, split among processes and resumable;
    --figures: also reconstructions, interpolations and (--nz 2) the manifold, in --out."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "vae", ddp, command="--sample")
    stop = common.Stop(ddp)
    model = build(cfg, ddp.device).eval()
    if cfg.figures and model.classes:
        raise common.UserError("--figures draws an unconditional model's reconstructions and walks; for a "
                               "--conditional one, --sample N --class c draws each class")
    if cfg.class_ >= max(model.classes, 1):
        raise common.UserError(f"--class {cfg.class_}: give it with a --conditional model's classes, 0 to "
                               f"{model.classes - 1}" if model.classes else "--class goes with a --conditional model")
    common.load_models(run, vae=model)
    done = common.write_sharded(run, lambda n, g, *y: sample(model, n, g, *y), cfg.sample, 500, {}, stop,
                                value_range=(0, 1), classes=model.classes)
    if done and cfg.figures and ddp.rank == 0:
        write_figures(model, cfg, run.out, ddp.device)


def nll_command(cfg: Config) -> None:
    """--nll N: the test -ELBO and IWAE's -L_k of the checkpoint on the first N test images, printed."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "vae", ddp, command="--nll")
    model = build(cfg, ddp.device).eval()
    common.load_models(run, vae=model)
    x, y = (t.to(ddp.device) for t in test_images(cfg, cfg.nll))
    scores = test_nll(model, x, cfg.k, seed=cfg.seed, y=y if model.classes else None, progress=lambda i, n, s: run.say(
        f"--nll: {i}/{n} test images | {common.duration(s)} | ETA {common.duration(s * (n - i) / i)}"))
    print(f"test_neg_elbo: {scores['test_neg_elbo']:.4f}  test_nll: {scores['test_nll']:.4f}  (nats per "
          f"image on {len(x)} test images; test_nll is IWAE's -L_{cfg.k}, an upper bound on -log p(x"
          + (" | y), y the true class)" if model.classes else "))"))
    if model.classes:   # M2 as a classifier: argmax_y p(x | y), a uniform p(y)
        accuracy = (class_nll(model, x, cfg.k, seed=cfg.seed).argmin(1) == y).float().mean().item()
        print(f"test_accuracy: {accuracy:.4f}  (argmax_y of -L_{cfg.k}'s p(x | y): M2 as a classifier)")


def score_command(cfg: Config) -> None:
    """--score IMAGES: each image's anomaly scores (higher = more anomalous) in a CSV, for anomaly.py."""
    run = common.resolve_run(cfg, "vae", common.Processes(cfg.device, connect=False), command="--score")
    model = build(cfg, run.ddp.device).eval()
    if model.classes:
        raise common.UserError("--score: score an unconditional model (anomaly.py trains one on the normal class, "
                               "--only-class c)")
    common.load_models(run, vae=model)
    images, labels = common.score_images(cfg, cfg.score)
    common.write_scores(run, anomaly_scores(model, images, cfg), labels)


def main():
    cfg = common.parse_config(Config)
    command = nll_command if cfg.nll else score_command if cfg.score else sample_command if cfg.sample else train
    command(cfg)


if __name__ == "__main__":
    common.run_main(main)
