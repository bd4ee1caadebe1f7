"""dcgan.py: the paper's recipe, pytorch/examples' parameter counts, and the shared CLI contract."""
import signal

import pytest
import torch
import torch.nn as nn

import common
import dcgan
from conftest import (assert_same_state, check_amp_change_on_resume, check_bad_flags, check_bad_inputs, check_compile,
                      check_ddp, check_exact_resume, check_sample, check_signal_resume, check_smoke, load,
                      random_inception_env, run_script)

SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4,
         "--device", "cpu"]
GAN_SMALL = ["--dataset", "synthetic", "--image-size", 12, "--batch-size", 16, "--g-hidden", 32,
             "--d-units", 8, "--device", "cpu"]


def test_defaults_are_the_papers():
    cfg = dcgan.Config()
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.batch_size) == (2e-4, 0.5, 0.999, 128)
    assert (cfg.nz, cfg.ngf, cfg.ndf, cfg.leak, cfg.init_std, cfg.image_size) == (100, 64, 64, 0.2, 0.02, 64)


def test_parameter_counts_match_pytorch_examples():
    G, D = dcgan.Generator(100, 64, 3, 64), dcgan.Discriminator(64, 3, 64, 0.2)
    assert common.count_parameters(G) == 3_576_704
    assert common.count_parameters(D) == 2_765_568


@pytest.mark.parametrize("size", [28, 32, 64, 128])
def test_shapes(size):
    G, D = dcgan.Generator(100, 8, 1, size), dcgan.Discriminator(8, 1, size, 0.2)
    x = G(torch.rand(3, 100))
    assert x.shape == (3, 1, size, size) and D(x).shape == (3,)


def test_unsupported_size_is_a_clear_error():
    with pytest.raises(common.UserError, match="--image-size 48"):
        dcgan.ladder(48)


def test_architecture_guidelines():
    G, D = dcgan.Generator(100, 64, 3, 64), dcgan.Discriminator(64, 3, 64, 0.2)
    g, d = list(G.net), list(D.net)
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.Linear)) for m in g + d)
    assert isinstance(g[-2], nn.ConvTranspose2d) and isinstance(g[-1], nn.Tanh)        # no BN on G's output
    assert isinstance(d[0], nn.Conv2d) and isinstance(d[1], nn.LeakyReLU)              # no BN on D's input
    assert all(isinstance(m, nn.ReLU) for m in g if isinstance(m, (nn.ReLU, nn.LeakyReLU)))
    assert all(m.negative_slope == 0.2 for m in d if isinstance(m, nn.LeakyReLU))
    assert all(c.stride == (2, 2) for c in d[:-1] if isinstance(c, nn.Conv2d))


def test_initialisation():
    torch.manual_seed(0)
    G = dcgan.Generator(100, 64, 3, 64)
    dcgan.init_weights(G, 0.02)
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
    gamma = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    assert abs(gamma.mean() - 1) < 5e-3 and abs(gamma.std() - 0.02) < 5e-3


def test_z_is_uniform_on_minus_one_one():
    z = dcgan.sample_z(10_000, 100, "cpu")
    assert z.min() >= -1 and z.max() <= 1 and abs(z.mean()) < 0.01 and abs(z.var() - 1 / 3) < 0.01


def test_interpolation_rows_walk_from_z_a_to_z_b():
    cfg = dcgan.Config(nz=8, seed=3)
    G = dcgan.Generator(8, 4, 1, 16)
    grid = dcgan.interpolation_grid(G, 2, cfg, "cpu", steps=5)
    g = torch.Generator("cpu").manual_seed(cfg.seed + 1)
    z_a, z_b = dcgan.sample_z(2, 8, "cpu", g), dcgan.sample_z(2, 8, "cpu", g)
    with torch.no_grad():
        assert torch.allclose(grid[0::5], G(z_a), atol=1e-6) and torch.allclose(grid[4::5], G(z_b), atol=1e-6)


def test_smoke(tmp):
    check_smoke("dcgan", SMALL, tmp)


def test_exact_resume(tmp):
    check_exact_resume("dcgan", SMALL, tmp)


def test_sigusr1_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("dcgan", SMALL, tmp, signal.SIGUSR1)


def test_sample_and_interpolation(tmp):
    check_sample("dcgan", SMALL, tmp)
    run_script("dcgan", "--out", tmp / "to-sample", "--sample", 2, "--interpolate", 3, cwd=tmp)
    from PIL import Image
    assert Image.open(tmp / "to-sample" / "interpolation.png").size == (10 * 18 + 2, 3 * 18 + 2)


def test_bad_inputs(tmp):
    check_bad_inputs("dcgan", SMALL, "gan", GAN_SMALL, tmp)
    proc = run_script("dcgan", *SMALL, "--image-size", 48, "--out", tmp / "odd", cwd=tmp, check=False)
    assert proc.returncode == 2 and "--image-size 48" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_flags(tmp):
    check_bad_flags("dcgan", SMALL, tmp, [(["--image-size", 48], ["--image-size 48"]), (["--beta1", 1], ["--beta1"]),
                                          (["--interpolate", 3], ["--interpolate goes with --sample"]),
                                          (["--lr", 0], ["--lr 0", "above 0"]), (["--init-std", 0], ["--init-std 0"])])


def test_load_from_python(tmp):
    """The documented notebook use: the generator from a checkpoint alone, config rebuilt from it."""
    run_script("dcgan", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    G = dcgan.load(tmp / "run" / "ckpt.pt")
    saved = torch.load(tmp / "run" / "ckpt.pt", weights_only=True)["models"]["G"]
    assert not G.training and all(torch.equal(v, saved[k]) for k, v in G.state_dict().items())
    assert G(torch.zeros(2, G.nz)).shape[0] == 2


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    check_ddp("dcgan", SMALL, tmp)


def test_amp_and_channels_last_resume_exactly(tmp):
    """bf16 autocast on the CPU (these CPUs have AVX512-BF16) in NHWC layout: the same exactness."""
    check_exact_resume("dcgan", [*SMALL, "--amp", "--channels-last"], tmp)


def test_channels_last_keeps_the_layer_of_1x1_z_nchw(tmp):
    """--channels-last: the layer taking z (1 x 1) keeps an NCHW weight, the others are NHWC. With an NHWC weight
    there, torch.compile on CUDA expected an NHWC weight gradient that cuDNN returned NCHW (docs/gpu-check.md)."""
    run_script("dcgan", *SMALL, "--channels-last", "--steps", 1, "--out", tmp / "run", cwd=tmp)
    G = load(tmp / "run" / "ckpt.pt")["models"]["G"]
    weights = [G[k] for k in sorted(G, key=lambda k: int(k.split(".")[1])) if G[k].ndim == 4]   # net.0, net.3, ...
    assert weights[0].is_contiguous() and not weights[0].is_contiguous(memory_format=torch.channels_last)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights[1:])


def test_compile_smoke_and_its_checkpoint_loads_plain(tmp):
    check_compile("dcgan", SMALL, tmp, "G")


def test_eval_every_logs_fid_keeps_best_and_changes_nothing(tmp):
    """--eval-every with (random-weight) Inception: FID and KID in metrics.csv, best.pt at the best step,
    and the training itself bit-identical to a run without evaluation. Offline without weights, the run
    goes on and says once how to get them."""
    import csv
    env = random_inception_env(tmp)
    evaluated = ["--eval-every", 2, "--eval-n", 8, "--eval-features", "inception", "--eval-metrics", "fid,kid"]
    run_script("dcgan", *SMALL, *evaluated, "--steps", 4, "--out", tmp / "eval", cwd=tmp, env=env)
    with open(tmp / "eval" / "metrics.csv", newline="") as f:
        fids = {int(r["step"]): float(r["fid"]) for r in csv.DictReader(f) if r["fid"]}
    assert sorted(fids) == [2, 4] and all(v > 0 for v in fids.values())
    assert load(tmp / "eval" / "best.pt")["step"] == min(fids, key=fids.get)
    assert list((tmp / "cache" / "gen-models").glob("ref-synthetic-16px-inception.npz"))
    run_script("dcgan", *SMALL, "--steps", 4, "--out", tmp / "plain", cwd=tmp)
    assert_same_state(load(tmp / "plain" / "ckpt.pt"), load(tmp / "eval" / "ckpt.pt"))
    proc = run_script("dcgan", *SMALL, *evaluated, "--steps", 4, "--out", tmp / "offline", cwd=tmp,
                      env={"TORCH_HOME": str(tmp / "empty"), "XDG_CACHE_HOME": str(tmp / "cache2")})
    assert proc.stdout.count("evaluation off for this run") == 1 and "done at step 4" in proc.stdout


def test_amp_may_change_on_resume_fp16_included(tmp):
    """A requeue onto another GPU type changes what --amp means; the fp16 GradScaler starts afresh."""
    check_amp_change_on_resume("dcgan", SMALL, tmp)
