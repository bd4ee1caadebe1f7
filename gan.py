"""Generative Adversarial Nets.

Ian J. Goodfellow, Jean Pouget-Abadie, Mehdi Mirza, Bing Xu, David Warde-Farley, Sherjil Ozair,
Aaron Courville, Yoshua Bengio. NeurIPS 2014. arXiv:1406.2661. Results and every command: docs/gan.md

A generator G maps noise z ~ p_z to images; a discriminator D outputs the probability that its input
came from the data rather than from G. They play the minimax game (eq. 1)

    min_G max_D V(D, G) = E_x~p_data[log D(x)] + E_z~p_z[log(1 - D(G(z)))]

trained by Algorithm 1: for each training iteration,
    for k steps:
        sample m noise vectors z and m examples x;
        update D by ascending  1/m sum_i [log D(x_i) + log(1 - D(G(z_i)))]
    sample m noise vectors z;
    update G by descending 1/m sum_i log(1 - D(G(z_i)))
with k = 1 in the paper's experiments. Early in training log(1 - D(G(z))) saturates, so the paper
(section 3) recommends training G to maximize log D(G(z)) instead: the "non-saturating" loss, our
default; `--loss minimax` gives the original form.

Architecture and optimisation are those of the official MNIST experiment (goodfeli/adversarial,
mnist.yaml), which the paper describes only in words:
    G: z (100, Gaussian) -> 1200 ReLU -> 1200 ReLU -> 784 sigmoid, weights U(-0.05, 0.05),
       output bias set to the logit of the mean training image;
    D: x -> dropout 0.2 -> maxout 240 units x 5 pieces -> dropout 0.5 -> maxout 240 x 5
       -> dropout 0.5 -> linear -> sigmoid, weights U(-0.005, 0.005);
    SGD, batch 100, lr 0.1 divided by 1.000004 after every update (floor 1e-6), momentum 0.5 rising
    linearly to 0.7 between epochs 1 and 250.
Images are in [0, 1] as in the paper (sigmoid output), not in [-1, 1] like our other scripts.

Deviations, each deliberate:
- The official code updates G and D simultaneously from one shared minibatch of samples; we follow
  Algorithm 1 (k D updates, then a G update from fresh noise).
- D's loss is the mean of the two cross-entropies, as in the official code (AdversaryCost2), i.e. half
  the Algorithm 1 objective: the learning rate 0.1 was tuned with that scale.
- D outputs a logit and the losses use softplus: log D = -softplus(-l), log(1 - D) = -softplus(l),
  the same mathematics without the overflow of log(sigmoid).
- PyTorch's SGD momentum (v = mu v + g; p -= lr v) equals pylearn2's (v = mu v - lr g; p += v) while
  lr and mu are constant; they differ slightly while the schedules move.
- The paper trained until the Parzen log-likelihood stopped improving; --steps 100000 (about 170
  Fashion-MNIST epochs) is our choice.
- We train on the whole training split (60,000 images) and take G's output bias from its mean, where
  mnist.yaml keeps images 50,000-60,000 for validation: our epochs, hence the momentum ramp, are 20% longer.

Usage (every command, the results and the speed: docs/gan.md):
    python gan.py                                     # Fashion-MNIST 28 x 28, samples in runs/gan-fashion-mnist
    python gan.py --resume                            # continue runs/gan-fashion-mnist (a requeued job too)
    sbatch submit.sh gan                              # on SLURM, requeued until done (GPUS=4: torchrun, DDP)
    python gan.py --sample 10000 --sample-out gan.npz   # images for fid.py
    python gan.py --dataset mnist --loss minimax      # the original minimax generator loss
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import fid
from common import arg


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(100_000, "G updates (the paper stopped on validation likelihood)", run=True, min=0)
    # Paper hyper-parameters (official mnist.yaml)
    image_size: int = arg(28, "images are image_size x image_size (28: MNIST)", min=1)
    batch_size: int = arg(100, "m, the minibatch size", min=1)
    lr: float = arg(0.1, "SGD learning rate at step 0", above=0)
    lr_decay: float = arg(1.000004, "lr is divided by this after every update", min=1)
    min_lr: float = arg(1e-6, "floor of the decayed lr", min=0)
    momentum: float = arg(0.5, "initial SGD momentum", min=0, below=1)
    final_momentum: float = arg(0.7, "momentum reached at epoch --momentum-saturate", min=0, below=1)
    momentum_saturate: int = arg(250, "epoch at which momentum reaches --final-momentum (linear from epoch 1)",
                                 min=2)
    nz: int = arg(100, "dimension of the Gaussian noise z", min=1)
    g_hidden: int = arg(1200, "units in each of G's two ReLU layers", min=1)
    d_units: int = arg(240, "maxout units in each of D's two layers", min=1)
    d_pieces: int = arg(5, "linear pieces per maxout unit", min=1)
    k: int = arg(1, "D updates per G update (Algorithm 1)", min=1)
    loss: str = arg("non-saturating", "generator loss: non-saturating (max log D(G(z))) | minimax",
                    choices=("non-saturating", "minimax"))


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class Maxout(nn.Module):
    """h_i(x) = max_j (x W_ij + b_ij), j = 1..pieces (Goodfellow et al. 2013, arXiv:1302.4389)."""

    def __init__(self, d_in: int, units: int, pieces: int):
        super().__init__()
        self.units, self.pieces = units, pieces
        self.linear = nn.Linear(d_in, units * pieces)

    def forward(self, x):
        return self.linear(x).view(-1, self.units, self.pieces).amax(dim=2)


class Generator(nn.Module):
    def __init__(self, nz: int, hidden: int, image_shape: tuple[int, int, int]):
        super().__init__()
        self.nz, self.image_shape = nz, image_shape
        self.net = nn.Sequential(
            nn.Linear(nz, hidden), nn.ReLU(),                # 1200
            nn.Linear(hidden, hidden), nn.ReLU(),            # 1200
            nn.Linear(hidden, math.prod(image_shape)),       # 784 logits of pixel intensities
        )
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.05, 0.05)
                nn.init.zeros_(m.bias)

    def init_output_bias(self, mean_image: torch.Tensor) -> None:
        """Start from the data's mean image: bias = logit(mean pixel), clipped as pylearn2 does."""
        m = mean_image.flatten().clamp(1e-7, 1 - 1e-7)
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.log(m / (1 - m)))

    def forward(self, z):
        return torch.sigmoid(self.net(z)).view(-1, *self.image_shape)  # C x H x W in [0, 1]


class Discriminator(nn.Module):
    def __init__(self, image_shape: tuple[int, int, int], units: int, pieces: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2), Maxout(math.prod(image_shape), units, pieces),   # 240
            nn.Dropout(0.5), Maxout(units, units, pieces),                    # 240
            nn.Dropout(0.5), nn.Linear(units, 1),                             # 1 logit
        )
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -0.005, 0.005)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.net(x).squeeze(1)  # logit l; D(x) = sigmoid(l)


# ----------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------
def discriminator_loss(logit_real, logit_fake):
    """-1/2 [log D(x) + log(1 - D(G(z)))], averaged over the batch (the official code's scale)."""
    return 0.5 * (F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean())


def generator_loss(logit_fake, kind: str):
    """minimax: log(1 - D(G(z))) (eq. 1); non-saturating: -log D(G(z)) (section 3)."""
    if kind == "minimax":
        return -F.softplus(logit_fake).mean()
    return F.softplus(-logit_fake).mean()


def schedules(cfg: Config, step: int, epoch: int) -> tuple[float, float]:
    """lr and momentum as pure functions of the update count and epoch (pylearn2's ExponentialDecay
    and MomentumAdjustor(start=1, saturate=250))."""
    lr = max(cfg.lr / cfg.lr_decay ** step, cfg.min_lr)
    ramp = min(max((epoch - 1) / (cfg.momentum_saturate - 1), 0.0), 1.0)
    return lr, cfg.momentum + (cfg.final_momentum - cfg.momentum) * ramp


# ----------------------------------------------------------------------------------------------
# Training: Algorithm 1
# ----------------------------------------------------------------------------------------------
def train_step(G, D, opt_G, opt_D, batches, cfg: Config, device, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict[str, torch.Tensor]:
    """One iteration of Algorithm 1. ``amp``: the autocast dtype (None: float32); ``scaler``: the
    GradScaler of fp16 (disabled, it passes the losses and steps through unchanged)."""
    m = batches.batch_size  # this process's share of the minibatch under torchrun
    # (1) for k steps: update D by ascending its stochastic gradient
    for _ in range(cfg.k):
        x = batches.next()
        z = torch.randn(m, cfg.nz, device=device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                fake = G(z)
            logit_real, logit_fake = D(x), D(fake)
            loss_D = discriminator_loss(logit_real, logit_fake)
        opt_D.zero_grad(set_to_none=True)
        scaler.scale(loss_D).backward()
        scaler.step(opt_D)

    # (2) sample fresh noise; update G by descending its stochastic gradient. D's own gradients are not
    # needed here: freezing D skips computing them (and DDP's sync of them).
    z = torch.randn(m, cfg.nz, device=device)
    D.requires_grad_(False)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logit_fake_G = D(G(z))
        loss_G = generator_loss(logit_fake_G, cfg.loss)
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)
    scaler.update()
    D.requires_grad_(True)

    return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(),
            "D_x": torch.sigmoid(logit_real.float()).mean().detach(),
            "D_G_z": torch.sigmoid(logit_fake.float()).mean().detach()}


def build(cfg: Config, device):
    shape = (common.dataset_channels(cfg.dataset), cfg.image_size, cfg.image_size)
    G = Generator(cfg.nz, cfg.g_hidden, shape).to(device)
    D = Discriminator(shape, cfg.d_units, cfg.d_pieces).to(device)
    return G, D


def load(path: str, device="cpu") -> Generator:
    """G of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        G = gan.load("runs/gan-fashion-mnist/ckpt.pt")
        images = G(torch.randn(64, G.nz))               # in [0, 1], 64 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "gan")
    G = Generator(cfg.nz, cfg.g_hidden, (common.dataset_channels(cfg.dataset), cfg.image_size, cfg.image_size))
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "gan", ddp)       # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, optimizers (official mnist.yaml) -------------------------------------------
    G, D = build(cfg, device)
    run.say(f"G: {common.count_parameters(G):,} parameters, D: {common.count_parameters(D):,} parameters")
    images, _ = common.training_set(cfg)            # --per-class N: the subset augment.py draws
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, value_range=(0.0, 1.0), rank=ddp.rank,
                             world=ddp.world)
    G.init_output_bias(images.float().mean(0) / 255)
    opt_G = torch.optim.SGD(G.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    opt_D = torch.optim.SGD(D.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    fixed_noise = torch.randn(64, cfg.nz, device=device)   # the same z for every sample grid of the run
    saved = dict(models={"G": G, "D": D}, optimizers={"G": opt_G, "D": opt_D}, data={"train": batches},
                 state={"fixed_noise": fixed_noise, "scaler": scaler})   # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    G_eval = G                                      # grids and evaluation use the plain module, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        G, D = (nn.parallel.DistributedDataParallel(m, device_ids=ddp.device_ids) for m in (G, D))
    if cfg.compile:
        G, D = torch.compile(G), torch.compile(D)
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, images, value_range=(0, 1)) if cfg.eval_every else None

    def save_samples(step: int) -> None:            # the fixed-noise grid, G in eval mode: drawing changes nothing
        with common.eval_mode(G_eval):
            common.save_grid(G_eval(fixed_noise), run.out / "samples" / f"{step:06d}.png", value_range=(0, 1))

    def draw(n: int, generator) -> torch.Tensor:    # --eval-every's samples
        with common.eval_mode(G_eval):
            return G_eval(torch.randn(n, cfg.nz, device=device, generator=generator))

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        lr, momentum = schedules(cfg, step, batches.epoch)      # lr decay per update, momentum ramp per epoch
        for group in opt_G.param_groups + opt_D.param_groups:
            group["lr"], group["momentum"] = lr, momentum
        losses = train_step(G, D, opt_G, opt_D, batches, cfg, device, amp, scaler)
        step += 1
        log.add(losses)
        if step % cfg.log_every == 0:
            log.write(step)
        if step % cfg.sample_every == 0 and ddp.rank == 0:
            save_samples(step)
        best = evaluate is not None and step % cfg.eval_every == 0 and evaluate(step, draw, log, stop)
        if step % cfg.ckpt_every == 0 or best or (cfg.keep_every and step % cfg.keep_every == 0):
            common.save_run(run, step, log, **saved, best=best)
    common.finish(run, step, log, stop, **saved)    # the last checkpoint, then how the run ended
    if ddp.rank == 0 and step > run.start_step and step % cfg.sample_every:
        save_samples(step)                          # and the last step's grid


def sample_command(cfg: Config) -> None:
    """--sample N: N images of the checkpoint's G in --sample-out, split among processes and resumable."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "gan", ddp, command="--sample")
    stop = common.Stop(ddp)
    shape = (common.dataset_channels(cfg.dataset), cfg.image_size, cfg.image_size)
    G = Generator(cfg.nz, cfg.g_hidden, shape).to(ddp.device).eval()
    common.load_models(run, G=G)
    common.write_sharded(run, lambda n, g: G(torch.randn(n, cfg.nz, device=ddp.device, generator=g)), cfg.sample,
                         500, {}, stop, value_range=(0, 1))


def main():
    cfg = common.parse_config(Config)
    sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
