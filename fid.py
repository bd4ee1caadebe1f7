"""Sample-quality metrics: FID, KID, Inception Score, precision/recall from one pass of a feature network
(Inception-v3, or a small classifier trained here for the offline 28x28 datasets), and the Classification
Accuracy Score of labelled samples. Details, measurements and every command: docs/metrics.md.

Papers
    FID  Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter. NeurIPS 2017, arXiv:1706.08500.
    KID  Binkowski, Sutherland, Arbel, Gretton. "Demystifying MMD GANs". ICLR 2018, arXiv:1801.01401.
    IS   Salimans, Goodfellow, Zaremba, Cheung, Radford, Chen. NeurIPS 2016, arXiv:1606.03498.
    P/R  Kynkaanniemi, Karras, Laine, Lehtinen, Aila. NeurIPS 2019, arXiv:1904.06991.
    CAS  Ravuri, Vinyals. "Classification Accuracy Score for Conditional Generative Models". NeurIPS 2019,
         arXiv:1905.10887.

Each image goes once through the feature network: x = its features (Inception: the 2048-d pool features), z =
its logits. With (mu, Sigma) the mean and covariance of x over a set of images:
    FID = ||mu_1 - mu_2||^2 + Tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2))
    KID = unbiased MMD^2 between the feature sets, kernel k(x, y) = (x.y / d + 1)^3, over 100 subsets of 1000
    IS  = exp(E_x KL(p(y|x) || p(y))),  p(y|x) = softmax(z),  over 10 splits
    precision = mean over generated x of f(x, real),  recall = mean over real x of f(x, generated),
          f(x, X) = 1 if ||x - x'|| <= ||x' - NN_3(x')|| for some x' in X (x inside X's k-NN balls)
    CAS = accuracy on the real test split of a classifier trained on generated (image, label) pairs only
FID is pytorch-fid's (v0.3.0): its Inception weights file and pre-processing (RGB uint8 -> /255 -> bilinear
299x299 -> 2x - 1), statistics in float64. Deviations: batch norms folded into the convolutions (features equal
to ~1e-5); the Frechet distance from symmetric eigendecompositions instead of scipy's sqrtm (< 1e-6 relative);
precision/recall in Inception's features instead of VGG-16's; folders read recursively.
--features fashion-mnist | mnist: the 128-d penultimate layer of a small convnet (Classifier) trained once by
`python fid.py --train-features fashion-mnist` (minutes on a CPU; refused below 92% / 99% test accuracy): no
download, its own scale, never comparable with Inception's. Fewer than 10,000 images on either side: a warning.

Usage
    python fid.py generated/ real/                        # FID of two folders of images (or .npz, or statistics)
    python fid.py generated.npz fashion-mnist:test --features fashion-mnist --kid --prc
    python fid.py --save-stats real/ real_stats.npz       # cache mu, sigma (and features) of real images
    python fid.py --train-features fashion-mnist          # once: the offline feature space
    python fid.py --cas generated.npz --dataset fashion-mnist    # .npz with `images` and `labels`
It prints one `name: value` line per metric (fid, kid_mean, kid_std, is_mean, is_std, precision, recall; cas,
real_accuracy). From Python: ref = fid.reference_stats(path, real_images); fid.evaluate(sample_fn, ref, n=10_000,
metrics=("fid", "kid")); lower level: load_inception, load_classifier, train_classifier, extract, statistics,
frechet_distance, kernel_inception_distance, inception_score, precision_recall, save_stats, load_stats.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import hashlib
import itertools
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid's port of TF's graph
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}  # pytorch-fid's
METRICS = ("fid", "kid", "isc", "prc")
# Classifier feature spaces: their dataset, and the test accuracy below which a classifier is refused
# (synthetic: 256 training and 64 test images, for the tests)
MIN_ACCURACY = {"fashion-mnist": 0.92, "mnist": 0.99, "synthetic": 0.75}
FEATURES = ("inception", *MIN_ACCURACY)
CLASSIFIER_EPOCHS = 6  # Fashion-MNIST: 92.7% in 2.4 min on 2 CPU cores (seeds 0-2); 8 epochs: 92.8%


class FIDError(common.UserError):
    """A problem the user can fix (missing weights, bad input): printed as one line by the CLI."""


class FIDWarning(UserWarning):
    """A number that is computed but should not be trusted or compared as it is (too few images)."""


# ----------------------------------------------------------------------------------------------
# The FID Inception-v3, bottom-up. Module names are torchvision's, so pytorch-fid's state dict loads.
# ----------------------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 1e-3) -> ReLU"""

    def __init__(self, c_in: int, c_out: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)  # the conv's or bn's own output: no copy needed

    def fold_batch_norm(self) -> None:
        """For inference: bn(conv(x)) = s * (w * x - mean) + beta, s = gamma / sqrt(var + eps), is one
        convolution with weights s * w and bias beta - s * mean (computed in float64, stored in float32):
        one pass over the activations instead of two."""
        conv, bn = self.conv, self.bn
        s = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding)
        with torch.no_grad():
            folded.weight.copy_(conv.weight.double() * s.view(-1, 1, 1, 1))
            folded.bias.copy_(bn.bias.double() - s * bn.running_mean.double())
        self.conv, self.bn = folded.to(conv.weight.device), nn.Identity()


def tf_avg_pool(x):
    """3x3 average pool, stride 1, whose border windows average only the pixels inside (TF's padding)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 grid: c_in -> 64 + 64 + 96 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """Grid reduction 35x35 -> 17x17: c_in -> 384 + 96 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3dbl, bp], 1)


class InceptionC(nn.Module):
    """17x17 grid with factorized 7x7 convolutions (1x7 then 7x1): 768 -> 4 x 192 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        bp = self.branch_pool(tf_avg_pool(x))
        return torch.cat([b1, b7, b7dbl, bp], 1)


class InceptionD(nn.Module):
    """Grid reduction 17x17 -> 8x8: 768 -> 320 + 192 + 768 channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 grid with expanded 1x3 / 3x1 outputs: c_in -> 320 + 768 + 768 + 192 = 2048 channels.
    `pool`: the FID graph max-pools in its last block (Mixed_7c), where the paper average-pools."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        self.pool = tf_avg_pool if pool == "avg" else functools.partial(F.max_pool2d, kernel_size=3, stride=1,
                                                                         padding=1)
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b3, b3dbl, bp], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 of TF's 2015-12-05 graph as ported by pytorch-fid: 23,850,960 parameters
    (torchvision's 27.2M less the auxiliary classifier, 1008 classes instead of 1000).
    prepare: uint8 images N x 3 x H x W -> forward: (pool features N x 2048, logits N x 1008)."""

    def __init__(self):
        super().__init__()
        self.memory_format = torch.contiguous_format
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # 1001 ImageNet classes + 7 unused, as in TF's graph

    def for_inference(self, channels_last: bool) -> FIDInceptionV3:
        """Eval mode without gradients, batch norms folded into the convolutions and, with channels_last,
        N x H x W x C activations (on the CPU, oneDNN's convolutions and pools run faster on them)."""
        for module in self.modules():
            if isinstance(module, BasicConv2d):
                module.fold_batch_norm()
        if channels_last:
            self.memory_format = torch.channels_last
            self.to(memory_format=self.memory_format)
        return self.eval().requires_grad_(False)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> [0, 1] as torchvision's ToTensor in pytorch-fid (a division, not a product)."""
        return x.float().div(255).contiguous(memory_format=self.memory_format)

    def forward(self, x):
        # pytorch-fid's order: resize the [0, 1] image, then scale to the [-1, 1] that TF's graph expects
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                                       # N x 3 x 299 x 299
        x = self.Conv2d_1a_3x3(x)                                           # N x 32 x 149 x 149
        x = self.Conv2d_2a_3x3(x)                                           # N x 32 x 147 x 147
        x = self.Conv2d_2b_3x3(x)                                           # N x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                        # N x 64 x 73 x 73
        x = self.Conv2d_3b_1x1(x)                                           # N x 80 x 73 x 73
        x = self.Conv2d_4a_3x3(x)                                           # N x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                        # N x 192 x 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                  # N x 288 x 35 x 35
        x = self.Mixed_6a(x)                                                # N x 768 x 17 x 17
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))   # N x 768 x 17 x 17
        x = self.Mixed_7a(x)                                                # N x 1280 x 8 x 8
        x = self.Mixed_7c(self.Mixed_7b(x))                                 # N x 2048 x 8 x 8
        pool = F.adaptive_avg_pool2d(x, 1).flatten(1)                       # N x 2048
        # IS as in Salimans et al.'s code: pool_3 times the softmax weights, without the bias
        logits = pool @ self.fc.weight.T                                    # N x 1008
        return pool, logits


@functools.lru_cache(maxsize=1)  # evaluate() runs every few thousand steps: read the 91 MB file once
def load_inception(weights: str | None = None, device: str = "cpu") -> FIDInceptionV3:
    """The FID Inception ready for inference on `device` (FIDInceptionV3.for_inference), from the file
    `weights`, or else from the torch hub cache, downloading pytorch-fid's file there when it is missing
    and the network allows."""
    if weights is None:
        weights = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
        if not os.path.exists(weights):
            os.makedirs(os.path.dirname(weights), exist_ok=True)
            try:
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, weights)
            except OSError as e:
                raise FIDError(f"cannot download the Inception weights ({e}): fetch {FID_WEIGHTS_URL} "
                               f"and pass --weights PATH, or put the file at {weights}") from None
    if not os.path.isfile(weights):
        raise FIDError(f"--weights {weights}: no such file; get it from {FID_WEIGHTS_URL}")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FIDError(f"--weights {weights}: not a readable PyTorch state dict ({type(e).__name__})") from None
    model = FIDInceptionV3()
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise FIDError(f"--weights {weights}: not pytorch-fid's Inception state dict "
                       f"({os.path.basename(FID_WEIGHTS_URL)})") from None
    return model.for_inference(channels_last=torch.device(device).type == "cpu").to(device)


# ----------------------------------------------------------------------------------------------
# The classifier feature spaces: a small convnet trained here on a 28x28 dataset, offline, in minutes
# ----------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """28x28 grayscale -> 128-d features (the penultimate layer: the feature space) -> class logits.
    prepare: uint8 images N x C x H x W -> forward: (features N x 128, logits N x classes)."""

    def __init__(self, classes: int = 10):
        super().__init__()

        def block(c_in, c_out):  # conv 3x3 -> batch norm -> ReLU -> max pool 2x2
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                    nn.MaxPool2d(2)]

        self.body = nn.Sequential(*block(1, 32),                  # N x 32 x 14 x 14
                                  *block(32, 64),                 # N x 64 x 7 x 7
                                  *block(64, 128),                # N x 128 x 3 x 3
                                  nn.Flatten(), nn.Linear(128 * 3 * 3, 128), nn.ReLU())   # N x 128
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(128, classes))

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """uint8 N x C x H x W, C = 1 or 3 -> float N x 1 x 28 x 28 in [0, 1]. RGB -> luma with PIL's
        convert("L") integer weights (L = (19595 R + 38470 G + 7471 B + 2^15) >> 16, so equal channels
        give back exactly that value), then other sizes resized (bilinear, antialiased, align_corners=False)."""
        if x.shape[1] == 3:
            w = torch.tensor([19595, 38470, 7471], dtype=torch.int32, device=x.device).view(1, 3, 1, 1)
            x = ((x.int() * w).sum(1, keepdim=True) + (1 << 15)) >> 16
        x = x.float().div(255)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=True, align_corners=False)
        return x

    def forward(self, x):
        features = self.body(2 * x - 1)
        return features, self.head(features)


def classifier_path(dataset: str) -> Path:
    """Where `python fid.py --train-features DATASET` saves its classifier by default: $FID_CLASSIFIER_DIR,
    else the user's cache (common.cache_dir())."""
    folder = os.environ.get("FID_CLASSIFIER_DIR")
    return (Path(folder).expanduser() if folder else common.cache_dir()) / f"fid-{dataset}.pt"


def _placed(net: nn.Module, device) -> nn.Module:
    """`net` on `device`, channels-last on the CPU: oneDNN's convolutions run faster on N x H x W x C
    (1.6x the classifier's training steps on this project's 2-core machine)."""
    net = net.to(device)
    return net.to(memory_format=torch.channels_last) if torch.device(device).type == "cpu" else net


def _prepared(images, chunk: int = 4096) -> torch.Tensor:
    """Classifier.prepare of uint8 images of any size and channels, a chunk at a time (RGB at 64x64 is 12 kB
    an image; prepared, 3 kB)."""
    return torch.cat([Classifier.prepare(to_uint8(images[i:i + chunk])) for i in range(0, len(images), chunk)])


@torch.inference_mode()
def accuracy(net: Classifier, images, labels, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `net` (in eval mode) on uint8 `images` and their int `labels`."""
    device = next(net.parameters()).device
    labels = torch.as_tensor(labels)
    correct = sum((net(_prepared(images[i:i + batch_size]).to(device))[1].argmax(1).cpu()
                   == labels[i:i + batch_size]).sum().item() for i in range(0, len(images), batch_size))
    return correct / len(images)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """torch.manual_seed(seed) and deterministic algorithms on the CPU (CUDA's need an environment
    variable), restoring the caller's RNG state and setting afterwards."""
    before = torch.are_deterministic_algorithms_enabled()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(before or device.type == "cpu")
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(before)


def train_classifier(images, labels, test_images, test_labels, min_accuracy: float = 0.0,
                     epochs: int = CLASSIFIER_EPOCHS, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                     device="cpu", log=None) -> tuple[Classifier, float]:
    """A Classifier trained on (images, labels) alone, in eval mode, and its accuracy on the test set.

    images: uint8 N x C x H x W, any size, gray or RGB (Classifier.prepare); labels: int 0..classes - 1,
    classes = the largest label of either set + 1. ``epochs`` passes in a seeded order of batches of 128
    (fit_classifier: the recipe). Bit-identical on the CPU for a given seed and thread count. A test accuracy
    below min_accuracy is a FIDError. log: where progress goes (default: stderr, as extract()'s).
    """
    device = common.pick_device(device) if isinstance(device, str) else device
    labels, test_labels = torch.as_tensor(labels).long(), torch.as_tensor(test_labels).long()
    x, y = _prepared(images).to(device), labels.to(device)  # once: the resize is not repeated every epoch
    steps_per_epoch = math.ceil(len(x) / batch_size)
    order, batches = torch.Generator().manual_seed(seed), []   # on the CPU: the same order on every device

    def batch(step: int):
        if step % steps_per_epoch == 0:
            batches[:] = torch.randperm(len(x), generator=order).to(device).split(batch_size)
        return x[batches[step % steps_per_epoch]], y[batches[step % steps_per_epoch]]
    classes = int(max(labels.max(), test_labels.max())) + 1
    net = fit_classifier(batch, epochs * steps_per_epoch, classes, lr, seed, device, log,
                         what=f"{len(x)} images: {epochs} epochs of {steps_per_epoch} steps")
    acc = accuracy(net, test_images, test_labels)
    if acc < min_accuracy:
        raise FIDError(f"test accuracy {acc:.2%} is below the {min_accuracy:.0%} a feature classifier needs: "
                       f"refused, nothing saved; train it again with another --seed")
    return net, acc


def fit_classifier(batch, steps: int, classes: int, lr: float = 2e-3, seed: int = 0, device="cpu", log=None,
                   what: str = "") -> Classifier:
    """The classifier recipe, the one definition every accuracy of this project uses (feature space, CAS,
    augment.py): a Classifier trained for ``steps`` steps on ``batch(step)`` (prepared images, labels), AdamW
    (weight decay 5e-4), the learning rate decayed from lr to 0 along a cosine, cross-entropy, seeded. Returned
    in eval mode. log: where a progress line goes every 10 s (default: stderr)."""
    log = log or functools.partial(print, file=sys.stderr, flush=True)
    t0 = t_said = time.time()
    log(f"training a classifier on {what or f'{steps} steps'}, on {device}")
    with _seeded(seed, device):
        net = _placed(Classifier(classes), device)
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
        net.train()
        for step in range(steps):
            for group in optimizer.param_groups:  # a pure function of the step
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            x, y = batch(step)
            loss = F.cross_entropy(net(x)[1], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if time.time() - t_said > 10 or step == steps - 1:   # a line every 10 s, with the time left
                t_said = time.time()
                log(f"step {step + 1}/{steps}: loss {loss.item():.4f}, {t_said - t0:.0f} s, "
                    f"ETA {(t_said - t0) * (steps - step - 1) / (step + 1):.0f} s")
    return net.eval().requires_grad_(False)


def _check_classifier_space(dataset: str) -> None:
    if dataset not in MIN_ACCURACY:
        raise FIDError(f"no classifier feature space for {dataset}; choose from {', '.join(MIN_ACCURACY)}")


def train_features(dataset: str, data_root: str = "data", path=None, seed: int = 0, device="auto",
                   epochs: int = CLASSIFIER_EPOCHS) -> float:
    """`python fid.py --train-features DATASET`: train_classifier on the dataset's training split, tested
    on its test split, refused below MIN_ACCURACY[dataset], saved atomically at `path` (default
    classifier_path(dataset)). Returns the test accuracy."""
    _check_classifier_space(dataset)
    path = Path(path) if path else classifier_path(dataset)
    try:  # before minutes of training
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "a folder, not a file")
    except OSError as e:
        raise FIDError(f"{path}: cannot write the classifier ({e.strerror})") from None
    train = common.load_images(dataset, data_root, split="train", labels=True)
    test = common.load_images(dataset, data_root, split="test", labels=True)
    t0 = time.time()
    net, acc = train_classifier(*train, *test, min_accuracy=MIN_ACCURACY[dataset], epochs=epochs, seed=seed,
                                device=device)
    config = {"dataset": dataset, "classes": net.head[-1].out_features, "seed": seed, "epochs": epochs}
    common.save_checkpoint({"script": "fid", "models": {"classifier": net.cpu().state_dict()},
                            "config": config, "test_accuracy": acc}, path)
    print(f"{dataset} classifier: test accuracy {acc:.2%}, trained in {time.time() - t0:.0f} s; saved to {path}")
    return acc


def load_classifier(dataset: str, device="cpu", path=None) -> tuple[Classifier, str]:
    """(the feature classifier of `dataset` in eval mode on `device`, "sha256:..." of its weights), from
    `path` (default classifier_path(dataset)). Missing: a FIDError naming the command that makes it."""
    _check_classifier_space(dataset)
    path = Path(path) if path else classifier_path(dataset)
    command = f"python fid.py --train-features {dataset}" + ("" if path == classifier_path(dataset)
                                                             else f" --classifier {path}")
    if not path.is_file():
        raise FIDError(f"no {dataset} feature classifier at {path}: make it with `{command}` (minutes on a CPU)")
    remake = f"make it again with `{command}`"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # data, never code
        trained_on = ckpt["config"]["dataset"]
    except Exception as e:  # truncated, not a checkpoint, not fid.py's
        raise FIDError(f"{path}: not a readable fid.py classifier ({type(e).__name__}); {remake}") from None
    if trained_on != dataset:
        raise FIDError(f"{path} is the {trained_on} feature classifier, not {dataset}'s")
    net = Classifier(ckpt["config"]["classes"])
    try:
        net.load_state_dict(ckpt["models"]["classifier"])
    except (KeyError, RuntimeError):
        raise FIDError(f"{path}: not a fid.py classifier state dict; {remake}") from None
    h = hashlib.sha256()
    for value in net.state_dict().values():
        h.update(value.numpy().tobytes())
    return _placed(net, device).eval().requires_grad_(False), f"sha256:{h.hexdigest()[:16]}"


class FeatureExtractor:
    """A feature space as a function: images N x C x H x W (uint8, or float in value_range; C = 1 or 3;
    any size) -> (features N x d, logits N x k), float32 tensors on the network's device.
    space:   "inception" or a classifier's dataset, as statistics files record it;
    weights: what they record of the network (the Inception file's name, or "sha256:..." of a classifier)."""

    def __init__(self, space: str, net: nn.Module, weights: str):
        self.space, self.net, self.weights = space, net, weights
        self.device = next(net.parameters()).device

    @torch.inference_mode()
    def __call__(self, images, value_range=(-1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_uint8(images, value_range).to(self.device)
        return self.net(self.net.prepare(x))


def feature_extractor(features="inception", device="auto", weights: str | None = None,
                      classifier=None) -> FeatureExtractor:
    """The network of a feature space on `device`: "inception" (pytorch-fid's weights: the file
    `weights`, or the torch hub cache) or a classifier space ("fashion-mnist", "mnist": the file
    `classifier`, or classifier_path(name)). A FeatureExtractor is returned as it is."""
    if isinstance(features, FeatureExtractor):
        return features
    device = common.pick_device(device) if isinstance(device, str) else device
    if _space(features) == "inception":
        return FeatureExtractor("inception", load_inception(weights, str(device)), _inception_record(weights))
    return FeatureExtractor(features, *load_classifier(features, device, classifier))


def _inception_record(weights: str | None) -> str:
    """The weights file's name (pytorch-fid's ends in the start of its sha256: hashing 91 MB at every call
    would cost more than the check is worth)."""
    return os.path.basename(weights or FID_WEIGHTS_URL)


# ----------------------------------------------------------------------------------------------
# Inputs: folders, image .npz, statistics .npz, tensors, iterables and functions -> uint8 batches
# ----------------------------------------------------------------------------------------------
def to_uint8(images, value_range=(-1.0, 1.0)) -> torch.Tensor:
    """N x C x H x W images, uint8 or float in `value_range`, C = 1 or 3 -> uint8 N x 3 x H x W tensor.
    Floats are mapped and rounded as common.to_uint8 writes the model scripts' PNGs, so evaluate() on a
    generator and fid.py on its written samples give the same numbers."""
    x = torch.as_tensor(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise FIDError(f"expected images N x C x H x W with C = 1 or 3, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        low, high = value_range
        if not low < high:
            raise FIDError(f"value_range {tuple(value_range)}: expected (low, high) with low < high")
        # common.to_uint8's mapping, without its move to the CPU: a generator's batch stays on its GPU
        x = ((x.detach().float() - low) * (255.0 / (high - low))).round().clamp(0, 255).to(torch.uint8)
    # grayscale -> RGB as PIL's convert("RGB"); contiguous N x C x H x W as in pytorch-fid, since the
    # strides of an N x H x W x C source would select other convolution kernels (differences of 1e-6)
    return x.expand(-1, 3, -1, -1).contiguous()


def _read_image(path) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))  # H x W x 3 uint8, as pytorch-fid reads it
    except OSError:  # e.g. a truncated file whose header was fine
        raise FIDError(f"{path}: not a readable image; remove it or fix it") from None


def _folder_batches(files: list, batch_size: int, num_workers: int):
    """Decode batches of images in `num_workers` threads, a few batches ahead of the network, in order."""
    def read(chunk):
        return torch.from_numpy(np.stack([_read_image(f) for f in chunk])).permute(0, 3, 1, 2)
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        ahead = collections.deque()
        for i in range(0, len(files), batch_size):
            ahead.append(pool.submit(read, files[i:i + batch_size]))
            if len(ahead) > num_workers:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _list_folder(path: Path) -> list:
    """All images under `path`, sorted; checks from the headers alone that they can be batched."""
    from PIL import Image
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
    if not files:
        raise FIDError(f"{path}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in this folder")
    size = None
    for f in files:
        try:
            with Image.open(f) as image:
                if size is None:
                    size, first = image.size, f
                elif image.size != size:
                    raise FIDError(f"{path}: images of different sizes ({first.name} is {size[0]}x{size[1]}, "
                                   f"{f.name} is {image.size[0]}x{image.size[1]}); resize them to one size")
        except OSError:
            raise FIDError(f"{f}: not a readable image; remove it or fix it") from None
    return files


def read_input(path) -> dict:
    """A path on the command line -> {"stats": {mu, sigma[, features]}} or {"images": files | array}."""
    path = Path(path)
    if path.is_dir():
        return {"images": _list_folder(path)}
    if not path.is_file():
        raise FIDError(f"{path}: no such file or folder")
    if path.suffix != ".npz":
        raise FIDError(f"{path}: expected a folder of images, an .npz of images or a statistics .npz")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception:
        raise FIDError(f"{path}: not a readable .npz file") from None
    if "mu" in arrays and "sigma" in arrays:
        return {"stats": arrays}
    images = arrays.get("images", next(iter(arrays.values())) if len(arrays) == 1 else None)
    if images is None:
        raise FIDError(f"{path}: has keys {sorted(arrays)}; expected 'mu' and 'sigma' (statistics) or one "
                       f"uint8 image array (key 'images')")
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0:
        raise FIDError(f"{path}: images must be uint8 N x H x W x C, N x C x H x W or N x H x W, "
                       f"got {images.dtype} {images.shape}")
    if images.ndim == 3:
        images = images[:, None]
    elif images.shape[-1] in (1, 3):  # channels last, as written by the model scripts and numpy users
        images = images.transpose(0, 3, 1, 2)
    if images.shape[1] not in (1, 3):
        raise FIDError(f"{path}: images must have 1 or 3 channels, got shape {images.shape}")
    return {"images": images}


def _batches(samples, batch_size: int, num_workers: int):
    """Images in any form evaluate() takes -> an iterable of batches."""
    if callable(samples):
        return (samples(batch_size) for _ in itertools.count())  # endless: extract() stops at n
    if isinstance(samples, list) and samples and isinstance(samples[0], Path):
        return _folder_batches(samples, batch_size, num_workers)
    if isinstance(samples, (np.ndarray, torch.Tensor)):
        return (samples[i:i + batch_size] for i in range(0, len(samples), batch_size))
    return samples


# ----------------------------------------------------------------------------------------------
# One pass of the network
# ----------------------------------------------------------------------------------------------
def extract(extractor: FeatureExtractor, batches, n: int | None = None, label: str = "images",
            total: int | None = None, value_range=(-1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Features (Inception: N x 2048) and logits (N x 1008), float32, of the first `n` images of `batches`
    (all if n is None; float images in `value_range`), with a progress line on stderr."""
    total = n or total
    features, logits, done, t0 = [], [], 0, time.time()
    for batch in batches:
        f, z = extractor(batch[:None if n is None else n - done], value_range)
        features.append(f.cpu().numpy())
        logits.append(z.cpu().numpy())
        done += len(f)
        _progress(label, done, total, t0)
        if done == n:
            break
    _progress(label, done, total, t0, final=True)
    if n is not None and done < n:
        raise FIDError(f"{label}: {n} images asked for, only {done} given")
    if done < 2:
        raise FIDError(f"{label}: at least 2 images are needed for a covariance, got {done}")
    return np.concatenate(features), np.concatenate(logits)


def _progress(label: str, done: int, total: int | None, t0: float, final: bool = False) -> None:
    """In place on a terminal; one line at the end in a log file."""
    if not (final or sys.stderr.isatty()):
        return
    rate = done / max(time.time() - t0, 1e-9)
    print(f"\r{label}: {done}/{total or '?'} images, {rate:.1f} images/s", end="\n" if final else "",
          file=sys.stderr, flush=True)


def statistics(features: np.ndarray) -> dict:
    """mu and sigma in float64 as pytorch-fid computes them, with the features kept for KID and P/R."""
    x = np.asarray(features, dtype=np.float64)
    return {"mu": x.mean(0), "sigma": np.cov(x, rowvar=False), "features": np.asarray(features, np.float32)}


def _check_writable(path: Path) -> None:
    """Before a long pass over the images: the statistics can be written there."""
    if path.suffix != ".npz":
        raise FIDError(f"{path}: statistics are saved as .npz; name the file *.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FIDError(f"{path}: cannot write the statistics ({e.strerror})") from None


def save_stats(path, stats: dict) -> None:
    """pytorch-fid's .npz (mu, sigma) plus `features`, written atomically (temp file + rename)."""
    path = Path(path)
    _check_writable(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **stats)
        os.replace(tmp, path)
    except OSError as e:
        raise FIDError(f"{path}: cannot write the statistics ({e.strerror})") from None


def load_stats(path) -> dict:
    source = read_input(path)
    if "stats" not in source:
        raise FIDError(f"{path}: not a statistics .npz (no 'mu' and 'sigma')")
    return source["stats"]


# ----------------------------------------------------------------------------------------------
# The metrics
# ----------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, Sigma1) and N(mu2, Sigma2), the FID of Heusel et al. 2017:

        d^2 = ||mu1 - mu2||^2 + Tr(Sigma1) + Tr(Sigma2) - 2 Tr((Sigma1 Sigma2)^(1/2))

    Tr((Sigma1 Sigma2)^(1/2)) = sum_i sqrt(lambda_i), lambda_i the eigenvalues of Sigma1 Sigma2. With
    Sigma1 = A A^T, A = V diag(sqrt(w)) from Sigma1's eigendecomposition, eig(A A^T Sigma2) = eig(A^T Sigma2 A)
    and A^T Sigma2 A is symmetric positive semi-definite: two symmetric eigensolvers replace scipy's sqrtm
    of the non-symmetric product (pytorch-fid). Rounding leaves tiny negative eigenvalues where a
    covariance is singular (fewer images than dimensions); they are set to 0, which is what pytorch-fid's
    eps*I offset and dropping of the imaginary part approximate.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise FIDError(f"statistics of different dimensions: {mu1.shape} and {mu2.shape}")
    w, V = np.linalg.eigh(sigma1)
    A = V * np.sqrt(np.clip(w, 0, None))
    lam = np.linalg.eigvalsh(A.T @ sigma2 @ A)
    tr_covmean = np.sqrt(np.clip(lam, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def kernel_inception_distance(f1, f2, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
                              device="cpu") -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): mean and std over `subsets` draws of
    m = min(subset_size, n1, n2) features from each set, of the unbiased estimator

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m(m-1)) + sum_{i != j} k(y_i, y_j) / (m(m-1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2,        k(x, y) = (x.y / d + 1)^3.

    Defaults: 100 subsets of 1000, as torch-fidelity and clean-fid (the authors' code draws 50).
    float64 (on `device`; CPU for MPS, which has none): the estimate is a small difference of large sums.
    """
    device = torch.device("cpu") if torch.device(device).type == "mps" else device
    f1 = torch.as_tensor(f1).to(device, torch.float64)
    f2 = torch.as_tensor(f2).to(device, torch.float64)
    m, d = min(subset_size, len(f1), len(f2)), f1.shape[1]
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same subsets on every device

    def k(a, b):
        return (a @ b.T / d + 1) ** 3

    mmd = []
    for _ in range(subsets):
        x = f1[torch.randperm(len(f1), generator=generator)[:m].to(device)]
        y = f2[torch.randperm(len(f2), generator=generator)[:m].to(device)]
        k_xx, k_yy = k(x, x), k(y, y)
        mmd.append((k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
                   + (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
                   - 2 * k(x, y).sum() / m ** 2)
    mmd = torch.stack(mmd).cpu().numpy()
    return float(mmd.mean()), float(mmd.std())


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS (Salimans et al. 2016) as their code computes it: for each of `splits` consecutive parts,
    exp(mean_x KL(p(y|x) || p(y))) with p(y) the part's mean of p(y|x); mean and std over the parts.
    10 splits, as in their code."""
    log_p_yx = torch.log_softmax(torch.as_tensor(logits, dtype=torch.float64), dim=1)
    n = len(log_p_yx)
    if n < splits:
        raise FIDError(f"the Inception Score needs at least {splits} images (one per split), got {n}")
    scores = []
    for i in range(splits):
        part = log_p_yx[i * n // splits:(i + 1) * n // splits]
        log_p_y = torch.logsumexp(part, dim=0) - np.log(len(part))  # log of the mean of p(y|x)
        kl = (part.exp() * (part - log_p_y)).sum(1)
        scores.append(kl.mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def precision_recall(real, fake, k: int = 3, device="cpu", block: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019). The manifold of a set Phi is
    the union of the balls B(phi, ||phi - NN_k(phi)||), NN_k the k-th nearest other point of Phi;
    f(phi, Phi) = 1 if phi lies in that union.

        precision = mean over generated phi_g of f(phi_g, Phi_real)
        recall    = mean over real phi_r of f(phi_r, Phi_gen)

    k = 3 as in the paper. Distances in float32 on `device`, `block` rows at a time (a full 50k x 50k
    matrix would be 10 GB).
    """
    real = torch.as_tensor(real).to(device, torch.float32)
    fake = torch.as_tensor(fake).to(device, torch.float32)

    def radii(x):  # k + 1: the nearest point of x to itself is itself
        return torch.cat([torch.cdist(b, x).kthvalue(k + 1, dim=1).values for b in x.split(block)])

    def inside(queries, x, r):
        return torch.cat([(torch.cdist(b, x) <= r).any(1) for b in queries.split(block)])

    if min(len(real), len(fake)) <= k:
        raise FIDError(f"precision/recall with k = {k} need more than {k} images on each side")
    precision = inside(fake, real, radii(real)).double().mean().item()
    recall = inside(real, fake, radii(fake)).double().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------
# The API the model scripts call, and the command line
# ----------------------------------------------------------------------------------------------
def _open(x, metrics, label: str) -> dict:
    """Anything evaluate() takes -> {"stats": ...} or {"images": ...}, checked before any network pass."""
    if isinstance(x, dict):
        source = {"stats": x}
    else:
        source = read_input(x) if isinstance(x, (str, Path)) else {"images": x}
    if "stats" in source:
        stats = source["stats"]
        if "isc" in metrics and "logits" not in stats:
            raise FIDError(f"{label}: the Inception Score needs the generated images, not statistics")
        for metric in ("kid", "prc"):
            if metric in metrics and "features" not in stats:
                raise FIDError(f"{label}: statistics with only mu and sigma (pytorch-fid's format) give FID, "
                               f"not {metric}; give the images, or statistics saved by fid.py --save-stats")
    return source


def _stats_of(source: dict, extractor_fn, n, batch_size: int, num_workers: int, label: str,
              value_range=(-1.0, 1.0)) -> dict:
    """{mu, sigma, features[, logits], space, weights}: read from the cache, or from one pass of the network."""
    if "stats" in source:
        return source["stats"]
    images = source["images"]
    total = len(images) if hasattr(images, "__len__") else None
    extractor = extractor_fn()
    features, logits = extract(extractor, _batches(images, batch_size, num_workers), n, label, total, value_range)
    return {**statistics(features), "logits": logits, **_network_record(extractor, None)}


def _space(features) -> str:
    """The name of a feature space given by name or as a FeatureExtractor, checked."""
    if isinstance(features, FeatureExtractor):
        return features.space
    if features not in FEATURES:
        raise FIDError(f"unknown --features {features}; choose from {', '.join(FEATURES)}")
    return features


def _network_record(features, weights: str | None) -> dict:
    """What statistics record of the network they come from: a FeatureExtractor's, or Inception's from
    the `weights` file's name alone (known without reading its 91 MB)."""
    if isinstance(features, FeatureExtractor):
        return {"space": np.array(features.space), "weights": np.array(features.weights)}
    return {"space": np.array("inception"), "weights": np.array(_inception_record(weights))}


def _check_comparable(stats: list, space: str, network: dict | None = None) -> None:
    """Statistics ((label, dict) pairs) are compared only in the feature space asked for and, in a classifier's,
    from one classifier (`network`: the record of the one that computes the other side now). Files that
    record no space (pytorch-fid's, an older fid.py's) are Inception's."""
    for label, s in stats:
        theirs = str(s.get("space", "inception"))
        if theirs != space:
            raise FIDError(f"{label}: statistics in the {theirs} feature space, not {space}: pass --features "
                           f"{theirs}, or compute them again")
    weights = {label: str(s["weights"]) for label, s in stats if "weights" in s}
    if network is not None:
        weights["this classifier"] = str(network["weights"])
    if space != "inception" and len(set(weights.values())) > 1:
        raise FIDError(f"statistics of different {space} classifiers ("
                       f"{', '.join(f'{label}: {w}' for label, w in weights.items())}): compute them again with one")


def _warn_if_few(stats: dict) -> None:
    """A FIDWarning when the smaller of the sets (label -> statistics) is too small for a trustworthy or
    comparable FID. Statistics without features (pytorch-fid's) do not say how many images they had."""
    sizes = {label: len(s["features"]) for label, s in stats.items() if "features" in s}
    if not sizes:
        return
    label = min(sizes, key=sizes.get)
    n, d = sizes[label], len(stats[label]["mu"])
    if n <= d:  # the covariance of n images has rank n - 1 at most
        message = f"the {d}x{d} covariance is singular: FID on N <= {d} images is unreliable and not comparable"
    elif n < 10_000:
        message = "FID is biased upwards on fewer than 10,000 images; compare only numbers computed with the same N"
    else:
        return
    warnings.warn(f"{message} ({label}: N = {n})", FIDWarning, stacklevel=3)  # names evaluate()'s caller


def evaluate(samples, reference, n: int | None = None, metrics=("fid",), batch_size: int = 50,
             device="auto", weights: str | None = None, num_workers: int = 4, value_range=(-1.0, 1.0),
             features="inception", classifier=None) -> dict:
    """Compare generated `samples` with a `reference`, from one pass of the network over each.

    samples:     images N x C x H x W (tensor/array, uint8 or float in value_range), an iterable of such
                 batches, a function batch_size -> batch, or a path (folder, image .npz, statistics .npz).
    reference:   a path or a dict from reference_stats()/load_stats() (real images: cache their statistics).
    n:           how many samples (needed for a function; default all).
    metrics:     any of "fid", "kid", "isc" (Inception Score of the samples), "prc" (precision/recall).
    value_range: (low, high) of float images, mapped to 0..255: (-1, 1) by default, (0, 1) for images in
                 [0, 1] (gan.py's); uint8 images and files are read as they are.
    features:    the feature space, "inception" (`weights`: its file), "fashion-mnist" or "mnist"
                 (`classifier`: its file, default classifier_path(name)), or a FeatureExtractor (then
                 `weights` and `classifier` are not used). Statistics of another space are refused.
    Returns the keys of the metrics asked for among fid, kid_mean, kid_std, is_mean, is_std,
    precision, recall. FID on fewer than 10,000 images on either side comes with a FIDWarning.
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise FIDError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if callable(samples) and n is None:
        raise FIDError("evaluate(sample_fn, ...) needs n, the number of images to generate")
    space = _space(features)
    device = common.pick_device(device) if isinstance(device, str) else device
    gen_label, ref_label = _name(samples, "samples"), _name(reference, "reference")
    gen, ref = _open(samples, metrics, gen_label), _open(reference, set(metrics) - {"isc"}, ref_label)
    network = None
    if space != "inception" and ("images" in gen or "images" in ref):
        features = feature_extractor(features, device, classifier=classifier)  # small: read now, checked first
        network = _network_record(features, None)
    _check_comparable([(label, source["stats"]) for label, source in ((gen_label, gen), (ref_label, ref))
                       if "stats" in source], space, network)
    # Inception's 91 MB are read only if images are given, and once
    extractor_fn = functools.cache(functools.partial(feature_extractor, features, device, weights, classifier))
    gen = _stats_of(gen, extractor_fn, n, batch_size, num_workers, gen_label, value_range)
    ref = _stats_of(ref, extractor_fn, None, batch_size, num_workers, ref_label, value_range)
    out = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(gen["mu"], gen["sigma"], ref["mu"], ref["sigma"])
        _warn_if_few({gen_label: gen, ref_label: ref})
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kernel_inception_distance(gen["features"], ref["features"], device=device)
    if "isc" in metrics:
        out["is_mean"], out["is_std"] = inception_score(gen["logits"])
    if "prc" in metrics:
        out["precision"], out["recall"] = precision_recall(ref["features"], gen["features"], device=device)
    return out


def _name(x, default: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else default


def _record(given, source: dict, network: dict, value_range) -> dict:
    """What statistics are computed from (`given`, opened as `source`), as stored beside them: `key`, a
    sha256 of the uint8 images the network sees (of a folder: of its file names, sizes and modification
    times, which needs no decoding), and the `space` and `weights` of the network (_network_record)."""
    h = hashlib.sha256()
    if "stats" in source:  # statistics already: keep the record of the images and network they came from
        stats = source["stats"]
        space = {"space": stats.get("space", np.array("inception"))}
        if "key" in stats:
            return {"key": stats["key"], "weights": stats["weights"], **space}
        h.update(np.ascontiguousarray(stats["mu"]).tobytes() + np.ascontiguousarray(stats["sigma"]).tobytes())
        return {"key": np.array(h.hexdigest()), "weights": np.array(""), **space}
    images = source["images"]
    if isinstance(images, list):  # a folder's files; names relative to it, so that it may be moved
        for f in images:
            st = f.stat()
            h.update(f"{f.relative_to(given)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:  # converted as extract() converts them: floats and their uint8 images share a key
        h.update(str(tuple(images.shape[2:])).encode())
        for i in range(0, len(images), 4096):
            h.update(to_uint8(images[i:i + 4096], value_range).cpu().numpy())
    return {"key": np.array(h.hexdigest()), **network}


def reference_stats(path, images=None, batch_size: int = 50, device="auto", weights: str | None = None,
                    num_workers: int = 4, value_range=(-1.0, 1.0), features="inception", classifier=None) -> dict:
    """Statistics of real `images` (a tensor/array, uint8 or float in value_range, or a path as on the
    command line) cached at `path`: pytorch-fid's mu and sigma, the features that KID and precision/recall
    need (4 bytes per image and dimension), and a record of what they were computed from (a sha256 of the
    images, or of a folder's file names, sizes and times; the feature space and the weights: see evaluate's
    `features`). The file is read back when its record matches; it is computed again and overwritten, with
    a line on stderr, when it does not or when it has no record (pytorch-fid's, an older fid.py's).
    images=None: read it as it is."""
    path = Path(path)
    if images is None:
        return load_stats(path)
    if not isinstance(images, (str, Path, np.ndarray, torch.Tensor)):  # batches cannot be hashed up front
        raise FIDError(f"reference_stats({str(path)!r}, images): give the images as one tensor/array or a "
                       f"path, not {type(images).__name__}")
    space = _space(features)
    device = common.pick_device(device) if isinstance(device, str) else device
    if space != "inception":  # a classifier is small: read now, its weights are in the record
        features = feature_extractor(features, device, classifier=classifier)
    label = _name(images, f"reference for {path}")
    source = _open(images, (), label)
    if "stats" in source:
        _check_comparable([(label, source["stats"])], space)
    record = _record(images, source, _network_record(features, weights), value_range)
    if path.exists():
        cached = load_stats(path)
        if "key" not in cached:
            why = "records no source images (pytorch-fid's or an older fid.py's)"
        elif str(cached["key"]) != str(record["key"]):
            why = "was computed from other images"
        elif str(cached.get("space", "inception")) != str(record["space"]):
            why = f"was computed in the {cached.get('space', 'inception')} feature space"
        elif str(cached["weights"]) != str(record["weights"]):
            why = f"was computed with other {space} weights ({cached['weights']})"
        else:
            return cached
        print(f"{path} {why}: computing it again", file=sys.stderr)
    _check_writable(path)
    extractor_fn = functools.partial(feature_extractor, features, device, weights)
    stats = _stats_of(source, extractor_fn, None, batch_size, num_workers, label, value_range)
    stats.pop("logits", None)
    stats = {**stats, **record}
    save_stats(path, stats)
    return stats


def classification_accuracy_score(images, labels, dataset: str, data_root: str = "data", classifier=None,
                                  seed: int = 0, epochs: int = CLASSIFIER_EPOCHS, device="auto") -> dict:
    """CAS (Ravuri & Vinyals 2019) of generated uint8 `images` N x C x H x W and their class `labels`: the
    accuracy on `dataset`'s real test split of a Classifier trained on them alone, as train_features
    trains the feature classifier on the real training split (same architecture, optimizer, epochs,
    seed). Returns {"cas": ..., "real_accuracy": that feature classifier's accuracy on the same split}."""
    _check_classifier_space(dataset)
    device = common.pick_device(device) if isinstance(device, str) else device
    real_net, _ = load_classifier(dataset, device, classifier)  # a missing one fails before any training
    classes = real_net.head[-1].out_features
    labels = torch.as_tensor(np.asarray(labels))
    if (labels.ndim != 1 or len(labels) != len(images) or labels.is_floating_point() or labels.is_complex()
            or labels.min() < 0 or labels.max() >= classes):
        raise FIDError(f"--cas needs one integer label in 0..{classes - 1} per image ({len(images)} images), got "
                       f"{labels.dtype} of shape {tuple(labels.shape)}" + (
                           f" in {labels.min().item()}..{labels.max().item()}" if labels.numel() else ""))
    test_images, test_labels = common.load_images(dataset, data_root, split="test", labels=True)
    _, cas = train_classifier(images, labels, test_images, test_labels, epochs=epochs, seed=seed, device=device)
    return {"cas": cas, "real_accuracy": accuracy(real_net, test_images, test_labels)}


def read_labelled(path) -> tuple[np.ndarray, np.ndarray]:
    """--cas's .npz: its images, as read_input reads them, and its `labels`."""
    source = read_input(path)
    if Path(path).suffix != ".npz" or "images" not in source:
        raise FIDError(f"{path}: --cas needs an .npz of images (key `images`) and their classes (key `labels`)")
    with np.load(path) as npz:
        if "labels" not in npz.files:
            raise FIDError(f"{path}: no `labels` (the class of each image) beside the images; --cas needs them")
        return source["images"], npz["labels"]


def _cli_input(arg: str, data_root: str):
    """A or B on the command line: a path that exists, else a built-in dataset's training images (NAME) or
    test images (NAME:test)."""
    if Path(arg).exists():
        return arg
    name, _, split = arg.partition(":")
    if name in common.DATASETS and split in ("", "test"):  # at the size it is stored in: the network resizes
        return common.load_images(name, data_root, split=split or "train")
    raise FIDError(f"{arg}: no such file or folder, nor a dataset ({', '.join(common.DATASETS)}; NAME:test for "
                   f"its test split)")


# ----------------------------------------------------------------------------------------------
# During training (--eval-every)
# ----------------------------------------------------------------------------------------------
class _Interrupted(Exception):
    """Raised from inside evaluate's sample function when a stop is requested."""


class Evaluator:
    """--eval-every's FID (and KID, precision/recall) of --eval-n generated images against ``real``, on rank 0,
    in --eval-features (auto: the 28x28 datasets' classifier, else Inception; docs/metrics.md). The samples come
    from their own seeded generator and the global random state is restored after: training is the same with
    and without evaluation. Offline without the feature network, the FID is off for the run, said once."""

    def __init__(self, run, real: torch.Tensor, value_range=(-1.0, 1.0)):
        cfg, self.run, self.real, self.value_range = run.cfg, run, real, value_range
        self.metrics, self.features = cfg.eval_metrics.split(","), cfg.eval_features
        if self.features == "auto":
            self.features = cfg.dataset if cfg.dataset in ("fashion-mnist", "mnist") else \
                "fashion-mnist" if cfg.dataset in ("edges2fashion", "sneaker2boot") else "inception"
        key = cfg.dataset if cfg.dataset != "folder" else \
            "folder-" + hashlib.sha256(str(Path(cfg.data_root).resolve()).encode()).hexdigest()[:8]
        self.ref_path = common.cache_dir() / f"ref-{key}-{real.shape[-1]}px-{self.features}.npz"
        self.ref, self.off = None, False

    def __call__(self, step: int, generate, log, stop, extra=None) -> bool:
        """At ``step``: the scores of ``generate(n, generator)``'s images (a stop request interrupts them between
        batches) and of ``extra(should_stop)`` (a dict of more scores, None when cut short), written by ``log``.
        Every rank calls it; each gets whether the FID is the best so far (then best.pt keeps this step)."""
        run, best = self.run, False
        if run.is_main and not stop.requested:
            t, rng, scores = time.time(), common.rng_state(run.ddp.device), {}
            scores.update(self._fid(generate, lambda: stop.requested) or {})
            if extra is not None and not stop.requested:
                scores.update(extra(lambda: stop.requested) or {})
            common.set_rng_state(rng, run.ddp.device)   # building a network draws from the global generators
            log.scores(step, scores, time.time() - t)
            best = scores.get("fid", math.inf) < run.best_fid
            run.best_fid = min(run.best_fid, scores.get("fid", math.inf))
        return run.ddp.from_main(best)

    def _fid(self, generate, should_stop) -> dict | None:
        device = self.run.ddp.device

        def batch(n: int):
            if should_stop():
                raise _Interrupted
            return generate(n, g)
        try:
            if self.off:
                return None
            if self.ref is None:
                self.ref_path.parent.mkdir(parents=True, exist_ok=True)
                self.ref = reference_stats(self.ref_path, self.real, device=device, features=self.features)
            g = torch.Generator(device).manual_seed(self.run.cfg.seed + 1)   # the same noise at every evaluation
            return evaluate(batch, self.ref, n=self.run.cfg.eval_n, metrics=self.metrics, device=device,
                            value_range=self.value_range, features=self.features)
        except _Interrupted:
            print("evaluation interrupted by the stop request: skipped", flush=True)
        except common.UserError as e:
            self.off = True
            print(f"evaluation off for this run: {e}", flush=True)
        return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", metavar="A", nargs="?", help="generated images, their statistics, or a dataset name "
                        "(--save-stats: any images or dataset)")
    parser.add_argument("b", metavar="B", nargs="?", help="reference images, their statistics, or a dataset name "
                        "(--save-stats: the .npz to write)")
    parser.add_argument("--kid", action="store_true", help="also the Kernel Inception Distance")
    parser.add_argument("--isc", action="store_true", help="also the Inception Score of A")
    parser.add_argument("--prc", action="store_true", help="also precision and recall of A against B (k = 3)")
    parser.add_argument("--save-stats", action="store_true", help="write the statistics of A to the .npz B")
    parser.add_argument("--features", default="inception", help=f"the feature space: {', '.join(FEATURES)} "
                        "(a classifier trained by --train-features; synthetic: for the tests) (default: inception)")
    parser.add_argument("--train-features", metavar="DATASET", help="train the classifier of the feature space "
                        f"DATASET ({', '.join(MIN_ACCURACY)}) on its training split, print its test accuracy, "
                        "and save it (refused below 92%% on Fashion-MNIST, 99%% on MNIST)")
    parser.add_argument("--cas", metavar="NPZ", help="Classification Accuracy Score of the generated images "
                        "in NPZ (keys `images` and `labels`), tested on --dataset's test split")
    parser.add_argument("--dataset", help=f"the real dataset of --cas ({', '.join(MIN_ACCURACY)})")
    parser.add_argument("--classifier", metavar="PATH", default=None, help="the classifier file of --features, "
                        "--train-features and --cas (default: fid-<dataset>.pt in the cache, docs/metrics.md)")
    parser.add_argument("--seed", type=int, default=0, help="the seed of --train-features and --cas (default: 0)")
    parser.add_argument("--data-root", default="data", help="where a dataset named as A or B is read from, as by the "
                        "model scripts (default: data)")
    parser.add_argument("--weights", default=None, help="the Inception weights file (default: torch hub's cache)")
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu) | cpu | cuda | cuda:1 | mps")
    parser.add_argument("--batch-size", type=int, default=50, help="images per network pass (default: 50)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding image files (default: min(8, CPUs))")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        parser.error("--batch-size must be at least 1 and --num-workers at least 0")
    try:
        if args.train_features:
            train_features(args.train_features, args.data_root, args.classifier, args.seed, args.device)
            return
        if args.cas:
            if not args.dataset:
                raise FIDError(f"--cas needs --dataset, the real dataset to test on ({', '.join(MIN_ACCURACY)})")
            scores = classification_accuracy_score(*read_labelled(args.cas), args.dataset, args.data_root,
                                                   args.classifier, args.seed, device=args.device)
        elif args.a is None or args.b is None:
            raise FIDError("give A and B (or --train-features DATASET, or --cas NPZ --dataset DATASET); see --help")
        elif args.save_stats:
            if Path(args.b).exists():
                raise FIDError(f"{args.b} exists; delete it first or choose another name")
            reference_stats(args.b, _cli_input(args.a, args.data_root), args.batch_size, args.device,
                            args.weights, args.num_workers, features=args.features, classifier=args.classifier)
            print(f"saved the statistics of {args.a} to {args.b}")
            return
        else:
            metrics = ["fid"] + [m for m in METRICS[1:] if getattr(args, m)]
            a, b = _cli_input(args.a, args.data_root), _cli_input(args.b, args.data_root)
            with warnings.catch_warnings():  # one `warning:` line on stderr, as the errors, every time
                warnings.simplefilter("always", FIDWarning)
                warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
                scores = evaluate(a, b, metrics=metrics, batch_size=args.batch_size, device=args.device,
                                  weights=args.weights, num_workers=args.num_workers, features=args.features,
                                  classifier=args.classifier)
    except common.UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, value in scores.items():
        print(f"{name}: {value:.6f}")


if __name__ == "__main__":
    main()
