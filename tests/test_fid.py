"""fid.py against pytorch-fid (network, pre-processing, Frechet distance), closed forms and direct
implementations of each metric, the classifier feature spaces and CAS (on the tiny synthetic space), and
the command line as a user runs it. Offline: random Inception weights.

The 2048-d comparison and the speed measurements run only when asked for:
    FID_BENCHMARK=1 python -m pytest -q -s tests/test_fid.py -k benchmark
    python tools/bench/bench_fid.py --n 2100 --rounds 1      # end to end, as a user runs both
"""
import contextlib
import io
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import fid
from conftest import OFFLINE_ENV, ROOT, assert_clean_error, run_script


# ----------------------------------------------------------------------------------------------
# Helpers: random weights that keep activations O(1), small images, pytorch-fid's network offline
# ----------------------------------------------------------------------------------------------
def random_inception_state(seed: int = 0) -> dict:
    """He-initialized convolutions and non-trivial batch-norm statistics: features of size ~1 that
    differ from image to image, so that comparisons to 1e-5 mean something."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in fid.FIDInceptionV3().state_dict().items():
        if k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(("bn.bias", "running_mean")):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.startswith("fc."):
            state[k] = torch.randn(v.shape, generator=g) / 2048 ** 0.5
        else:
            state[k] = v
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "random-inception.pth"
    torch.save(random_inception_state(), path)
    return str(path)


def images(n: int, size=(16, 16), seed: int = 0) -> np.ndarray:
    """uint8 N x H x W x 3: a random smooth colour field per image plus noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = rng.integers(0, 256, (n, 1, 1, 3))
    ramp = np.linspace(0, 1, w)[None, None, :, None] * rng.integers(-100, 100, (n, 1, 1, 3))
    return np.clip(base + ramp + rng.normal(0, 20, (n, h, w, 3)), 0, 255).astype(np.uint8)


def write_folder(path, array) -> str:
    path.mkdir(parents=True)
    for i, image in enumerate(array):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return str(path)


def pytorch_fid_network(monkeypatch, state):
    """pytorch-fid's InceptionV3 (FID blocks, resize, [-1, 1] scaling) with `state` instead of a download."""
    import pytorch_fid.inception
    monkeypatch.setattr(pytorch_fid.inception, "load_state_dict_from_url", lambda *a, **k: state)
    return pytorch_fid.inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()


def gaussian_features(n, d, seed, shift=0.0):
    """Low-rank plus noise, rectified: covariances shaped like Inception pool features."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d // 4, d)) / np.sqrt(d // 4)
    return np.maximum(rng.standard_normal((n, d // 4)) @ w + shift + 0.1 * rng.standard_normal((n, d)), 0)


def stats_of(x):
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n1,n2", [(1000, 800), (60, 90)])  # full rank; singular (n < d); 2048-d: benchmark
def test_frechet_equals_pytorch_fid(n1, n2):
    from pytorch_fid.fid_score import calculate_frechet_distance
    a, b = stats_of(gaussian_features(n1, 128, 0)), stats_of(gaussian_features(n2, 128, 1, shift=0.05))
    ours, theirs = fid.frechet_distance(*a, *b), calculate_frechet_distance(*a, *b)
    assert abs(ours - theirs) / theirs < 1e-6


def test_frechet_closed_forms():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0, 2, d), rng.uniform(0, 2, d)
    s1[:5] = 0  # singular
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(exact, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # commuting, not diagonal
    assert fid.frechet_distance(mu1, q * s1 @ q.T, mu2, q * s2 @ q.T) == pytest.approx(exact, rel=1e-9)
    # 2 x 2, not commuting: Tr sqrt(M) = sqrt(Tr M + 2 sqrt(det M)) for M with eigenvalues >= 0
    a, b = np.array([[2.0, 0.7], [0.7, 1.0]]), np.array([[0.5, -0.2], [-0.2, 3.0]])
    m = a @ b
    exact = np.trace(a) + np.trace(b) - 2 * np.sqrt(np.trace(m) + 2 * np.sqrt(np.linalg.det(m)))
    assert fid.frechet_distance(np.zeros(2), a, np.zeros(2), b) == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize("n", [40, 1000])  # singular and full-rank covariances of 128-d features
def test_frechet_self_is_zero_and_symmetric(n):
    a, b = stats_of(gaussian_features(n, 128, 0)), stats_of(gaussian_features(n, 128, 1, shift=0.1))
    assert abs(fid.frechet_distance(*a, *a)) < 1e-6 * np.trace(a[1])  # sqrt of rounding-size eigenvalues
    assert fid.frechet_distance(*a, *b) == pytest.approx(fid.frechet_distance(*b, *a), rel=1e-8)


# ----------------------------------------------------------------------------------------------
# The network and the pre-processing against pytorch-fid
# ----------------------------------------------------------------------------------------------
def test_state_dict_is_pytorch_fids():
    """Built as pytorch_fid.inception.fid_inception_v3 builds it, without its download."""
    import torchvision
    from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
    theirs = {k: v.shape for k, v in net.state_dict().items()}
    ours = {k: v.shape for k, v in fid.FIDInceptionV3().state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in fid.FIDInceptionV3().parameters()) == 23_850_960


def test_features_equal_pytorch_fids(tmp_path, monkeypatch, weights):
    """Same PNG files, same random weights: pytorch-fid's loader, resize, scaling and network vs ours, as
    built (the port) and as run (batch norms folded into the convolutions, channels-last on the CPU)."""
    from pytorch_fid.fid_score import get_activations
    folder = write_folder(tmp_path / "png", images(3, size=(30, 40), seed=3))  # not square, not 299
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    theirs = get_activations(files, pytorch_fid_network(monkeypatch, torch.load(weights)), batch_size=3,
                             dims=2048, device="cpu", num_workers=0)
    port = fid.FIDInceptionV3()
    port.load_state_dict(torch.load(weights))
    for net, tolerance in ((port.eval(), dict(rtol=0, atol=1e-5)),
                           # float rounding of the folded weights, ~1e-5 on features of size 1 to 30; a wrong
                           # fold (say, eps left out) is off by 1e-3 of the values or more
                           (fid.load_inception(weights, "cpu"), dict(rtol=1e-5, atol=1e-5))):
        extractor = fid.FeatureExtractor("inception", net, "random")
        ours, _ = fid.extract(extractor, fid._batches(fid.read_input(folder)["images"], batch_size=3, num_workers=1))
        assert ours.std(0).mean() > 0.05  # the images do give different features
        np.testing.assert_allclose(ours, theirs, **tolerance)


def test_floats_are_rounded_like_the_written_samples():
    x = torch.linspace(-1.2, 1.2, 3 * 8 * 8 * 2).reshape(2, 3, 8, 8)
    assert torch.equal(fid.to_uint8(x), common.to_uint8(x))
    assert torch.equal(fid.to_uint8(x, (0, 1)), common.to_uint8(x, (0, 1)))  # gan.py's images
    gray = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    assert torch.equal(fid.to_uint8(gray), gray.repeat(1, 3, 1, 1))


def test_float_images_in_either_value_range(tmp_path, weights):
    """The same images as uint8, as floats in [-1, 1] and as floats in [0, 1] (gan.py's, the VAE's)
    with their value_range: the same features, so the same statistics and scores."""
    x = torch.from_numpy(images(2, seed=4)).permute(0, 3, 1, 2).contiguous()  # uint8 N x 3 x H x W
    in_pm1, in_01 = x / 127.5 - 1, x / 255
    flags = dict(batch_size=2, device="cpu", weights=weights)
    ref = fid.reference_stats(tmp_path / "uint8.npz", x, **flags)
    floats = fid.reference_stats(tmp_path / "floats.npz", in_01, value_range=(0, 1), **flags)
    for k in ("mu", "sigma", "features"):
        np.testing.assert_array_equal(floats[k], ref[k])
    kid = fid.evaluate(x, ref, metrics=("kid",), **flags)  # KID: cheap on 2 images, FID needs a 2048-d eigh
    for samples, value_range in ((in_pm1, (-1, 1)), (in_01, (0, 1))):
        assert fid.evaluate(samples, ref, metrics=("kid",), value_range=value_range, **flags) == kid
    with pytest.raises(fid.FIDError, match="low < high"):
        fid.to_uint8(in_01, (1, 0))


def test_npz_layouts(tmp_path):
    x = images(3, size=(6, 7))
    nchw = x.transpose(0, 3, 1, 2)
    for name, array in {"nhwc": x, "nchw": nchw}.items():
        np.savez(tmp_path / f"{name}.npz", images=array)
        np.testing.assert_array_equal(fid.read_input(tmp_path / f"{name}.npz")["images"], nchw)
    np.savez(tmp_path / "gray.npz", x[..., 0])  # N x H x W under numpy's default key
    gray = fid.read_input(tmp_path / "gray.npz")["images"]
    np.testing.assert_array_equal(fid.to_uint8(gray).numpy(), np.repeat(nchw[:, :1], 3, axis=1))


# ----------------------------------------------------------------------------------------------
# KID, IS, precision/recall against direct implementations and known values
# ----------------------------------------------------------------------------------------------
def test_kid_is_the_unbiased_mmd():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 2, (12, 6)), rng.uniform(0.3, 2, (12, 6))
    d, m = x.shape[1], len(x)

    def k(a, b):
        return (a @ b / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2
    # subsets as large as the sets: every subset is a permutation of the whole set
    mean, std = fid.kernel_inception_distance(x, y, subsets=3)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std < 1e-12
    # smaller subsets: random, but the same on every call
    assert fid.kernel_inception_distance(x, y, subset_size=5) == fid.kernel_inception_distance(x, y, subset_size=5)


def test_inception_score_extremes():
    assert fid.inception_score(np.zeros((40, 1008))) == pytest.approx((1.0, 0.0))
    confident = 100 * np.eye(10)[np.arange(100) % 10]  # each split of 10 sees every class once
    assert fid.inception_score(confident) == pytest.approx((10.0, 0.0))


def test_precision_recall():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(50, 8))
    assert fid.precision_recall(real, real.copy()) == (1.0, 1.0)
    assert fid.precision_recall(real, real + 100) == (0.0, 0.0)
    # by hand, k = 1: every real point's ball has radius 1, so 0.5 is inside and 10 is not;
    # both generated points have radius 9.5, which covers every real point
    real = np.arange(5.0)[:, None]
    assert fid.precision_recall(real, np.array([[0.5], [10.0]]), k=1) == (0.5, 1.0)


# ----------------------------------------------------------------------------------------------
# The API the model scripts call
# ----------------------------------------------------------------------------------------------
def test_evaluate_with_a_generator_and_cached_reference(tmp_path, weights):
    real = torch.from_numpy(images(4, seed=5)[..., :1]).permute(0, 3, 1, 2)  # uint8 grayscale N x 1 x H x W
    path = tmp_path / "ref.npz"
    ref = fid.reference_stats(path, real, batch_size=4, device="cpu", weights=weights)
    assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048) and ref["features"].shape == (4, 2048)
    assert fid.reference_stats(path, None)["mu"].tobytes() == ref["mu"].tobytes()  # read back, not recomputed

    g = torch.Generator().manual_seed(0)
    scores = fid.evaluate(lambda b: torch.rand(b, 3, 16, 16, generator=g) * 2 - 1, str(path), n=5,
                          metrics=("kid", "prc"), batch_size=2, device="cpu", weights=weights)
    assert set(scores) == {"kid_mean", "kid_std", "precision", "recall"}  # FID: the tests below
    assert scores["kid_mean"] > 0 and 0 <= scores["precision"] <= 1 and 0 <= scores["recall"] <= 1


def no_network(*args, **kwargs):
    raise AssertionError("the Inception network ran")


def test_reference_stats_are_recomputed_for_other_images(tmp_path, monkeypatch, capsys, weights):
    """The cache is keyed by the images: the same images read it back, other images (or a file that
    records no images, as pytorch-fid's) compute it again and overwrite it."""
    x = torch.from_numpy(images(2, seed=6)).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(images(2, seed=7)).permute(0, 3, 1, 2).contiguous()
    path, flags = tmp_path / "ref.npz", dict(batch_size=2, device="cpu", weights=weights)
    first = fid.reference_stats(path, x, **flags)
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(fid, "extract", no_network)
        m.setattr(fid, "load_inception", no_network)
        assert fid.reference_stats(path, x, **flags)["mu"].tobytes() == first["mu"].tobytes()
        fid.reference_stats(path, x.numpy() / 255, value_range=(0, 1), **flags)  # the same images as floats
    assert capsys.readouterr().err == ""

    other = fid.reference_stats(path, y, **flags)
    assert "was computed from other images: computing it again" in capsys.readouterr().err
    assert not np.allclose(other["mu"], first["mu"])
    assert fid.load_stats(path)["mu"].tobytes() == other["mu"].tobytes()  # overwritten

    np.savez(path, mu=first["mu"], sigma=first["sigma"])  # pytorch-fid's format: no record of the images
    again = fid.reference_stats(path, x, **flags)
    assert "records no source images" in capsys.readouterr().err
    assert again["mu"].tobytes() == first["mu"].tobytes() and "key" in fid.load_stats(path)
    with pytest.raises(fid.FIDError, match="one tensor/array or a path"):
        fid.reference_stats(path, iter([x]))  # batches cannot be keyed before they are read


def test_few_images_come_with_a_warning():
    """With no more images than dimensions (2048; 16 here) the covariance is singular; below 10,000,
    FID is biased upwards. Statistics without features (pytorch-fid's) do not say how many."""
    def stats(n):
        return fid.statistics(gaussian_features(n, 16, seed=n))

    big = stats(10_000)
    with pytest.warns(fid.FIDWarning, match=r"the 16x16 covariance is singular: .*\(samples: N = 10\)"):
        fid.evaluate(stats(10), big)
    with pytest.warns(fid.FIDWarning, match=r"biased upwards on fewer than 10,000 .*\(reference: N = 500\)"):
        fid.evaluate(big, stats(500))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fid.evaluate(big, stats(20_000))
        small = stats(10)
        fid.evaluate(big, {"mu": small["mu"], "sigma": small["sigma"]})
        fid.evaluate(stats(10), big, metrics=("kid",))  # KID is unbiased


def test_cache_keys(tmp_path):
    """What reference_stats compares, without the network: the uint8 images (whatever their layout or
    value range), a folder's names, sizes and times, and the weights file's name."""
    def key(given, weights=None, value_range=(-1.0, 1.0)):
        source = fid._open(given, (), "test")
        return {k: str(v) for k, v in fid._record(given, source, fid._network_record("inception", weights),
                                                   value_range).items()}

    x = images(3, seed=8)
    np.savez(tmp_path / "x.npz", images=x)  # N x H x W x C
    nchw = torch.from_numpy(x).permute(0, 3, 1, 2)
    assert key(nchw) == key(str(tmp_path / "x.npz")) == key(nchw / 255, value_range=(0, 1))
    assert key(nchw)["key"] != key(nchw.flip(0))["key"]
    assert key(nchw, "/weights/other.pth")["weights"] == "other.pth" != key(nchw)["weights"]

    folder = write_folder(tmp_path / "png", x)
    before = key(folder)
    assert key(folder) == before
    time.sleep(0.01)
    Image.fromarray(x[0] // 2).save(tmp_path / "png" / "001.png")  # rewritten in place
    assert key(folder)["key"] != before["key"]


# ----------------------------------------------------------------------------------------------
# The command line, as a user runs it
# ----------------------------------------------------------------------------------------------
def scores_of(stdout: str) -> dict:
    return {k: float(v) for k, v in (line.split(": ") for line in stdout.strip().splitlines())}


def one_line_error(argv, capsys, *words) -> None:
    """fid.main(argv) stops with exit 2 and one `error: ` line on stderr that holds each of `words`."""
    with pytest.raises(SystemExit) as stop:
        fid.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
    for word in words:
        assert word in err, (word, err)


def test_cli_folder_against_npz(tmp_path, weights):
    a = write_folder(tmp_path / "a", images(10, seed=1))  # 10 images: one per Inception Score split
    b = tmp_path / "b.npz"
    np.savez(b, images=images(4, seed=2))  # the model scripts' --sample format
    proc = run_script("fid", a, b, "--kid", "--isc", "--prc", "--weights", weights, "--device", "cpu",
                      "--batch-size", 7, cwd=tmp_path)
    scores = scores_of(proc.stdout)
    assert list(scores) == ["fid", "kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"]
    assert scores["fid"] > 0 and scores["is_mean"] >= 1 and 0 <= scores["precision"] <= 1
    assert "a: 10/10 images" in proc.stderr and "b.npz: 4/4 images" in proc.stderr  # the progress lines
    warned = [line for line in proc.stderr.splitlines() if "arning" in line]  # one line, not Python's two
    assert len(warned) == 1 and warned[0].startswith("warning: the 2048x2048 covariance is singular: ")
    assert warned[0].endswith(f"({b}: N = 4)")


def test_save_stats_round_trip(tmp_path, capsys, weights):
    b = tmp_path / "b.npz"
    np.savez(b, images=images(4, seed=2).transpose(0, 3, 1, 2))  # N x C x H x W this time
    flags = ["--weights", weights, "--device", "cpu"]
    fid.main(["--save-stats", str(b), str(tmp_path / "stats.npz"), *flags])
    with np.load(tmp_path / "stats.npz") as saved:  # pytorch-fid's keys and dtypes, plus the features
        assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048)
        assert saved["mu"].dtype == saved["sigma"].dtype == np.float64 and saved["features"].shape == (4, 2048)
        trace = np.trace(saved["sigma"])
    capsys.readouterr()
    fid.main([str(b), str(tmp_path / "stats.npz"), "--kid", "--prc", *flags])  # images vs their own statistics
    scores = scores_of(capsys.readouterr().out)
    assert abs(scores["fid"]) < 1e-6 * trace and scores["precision"] == scores["recall"] == 1


def test_dataset_by_name(tmp_path, monkeypatch, weights):
    """A built-in dataset named as A or B is its training split (NAME:test, its test split), as
    common.load_images gives it at its stored size, read from --data-root: the same statistics as those
    images written to an .npz."""
    load_images, calls = common.load_images, []

    def first_three(*args, **kwargs):  # 3 of the synthetic images: seconds, not minutes, of Inception on a CPU
        calls.append((*args, kwargs.get("split", "train")))
        return load_images(*args, **kwargs)[:3]

    monkeypatch.setattr(common, "load_images", first_three)
    monkeypatch.chdir(tmp_path)
    flags = ["--weights", weights, "--device", "cpu", "--data-root", "root"]
    fid.main(["--save-stats", "synthetic", "named.npz", *flags])
    assert calls == [("synthetic", "root", "train")]
    np.savez("images.npz", images=load_images("synthetic", "root", 28)[:3].permute(0, 2, 3, 1).numpy())
    fid.main(["--save-stats", "images.npz", "from-npz.npz", *flags])
    named, from_npz = fid.load_stats("named.npz"), fid.load_stats("from-npz.npz")
    for k in ("mu", "sigma", "features", "key"):
        np.testing.assert_array_equal(named[k], from_npz[k])
    # as A or B of a comparison (main reads both through _cli_input; its FID would cost a 2048-d eigh)
    assert torch.equal(fid._cli_input("synthetic", "root"), load_images("synthetic", "root", 28)[:3])
    assert calls[-1] == ("synthetic", "root", "train")
    assert torch.equal(fid._cli_input("synthetic:test", "root"), load_images("synthetic", "root", split="test")[:3])
    assert calls[-1] == ("synthetic", "root", "test")

    # a path that exists is a path, even with a dataset's name; anything else is named in the error
    write_folder(tmp_path / "mnist", images(2))
    assert fid._cli_input("mnist", "root") == "mnist"
    with pytest.raises(fid.FIDError, match="no-such: no such file or folder, nor a dataset"):
        fid._cli_input("no-such", "root")


def test_missing_dataset_offline(tmp_path):
    """A dataset that is not under --data-root and cannot be downloaded: common's one line, no file."""
    proc = run_script("fid", "--save-stats", "mnist", "out.npz", "--data-root", tmp_path / "empty", cwd=tmp_path,
                      check=False)
    assert_clean_error(proc, "mnist", "--data-root")
    assert not (tmp_path / "out.npz").exists()


def bad_inputs(tmp_path, weights):
    """(argv, words the one-line message must contain) for each mistake a user can make."""
    good = write_folder(tmp_path / "good", images(3))
    (tmp_path / "empty").mkdir()
    mixed = write_folder(tmp_path / "mixed", images(2))
    Image.fromarray(images(1, size=(8, 8))[0]).save(tmp_path / "mixed" / "small.png")
    np.savez(tmp_path / "keys.npz", a=np.zeros(3), b=np.zeros(3))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "pytorch-fid.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    truncated = write_folder(tmp_path / "truncated", images(2))
    png = tmp_path / "truncated" / "000.png"
    png.write_bytes(png.read_bytes()[:100])  # the header is intact, the pixels are not
    w = ["--weights", weights]
    return [
        ([good, tmp_path / "empty", *w], ["empty", "no images"]),
        ([good, mixed, *w], ["different sizes", "small.png"]),
        ([good, tmp_path / "keys.npz", *w], ["keys", "'images'"]),
        ([good, tmp_path / "float.npz", *w], ["uint8"]),
        ([good, tmp_path / "missing", *w], ["missing", "no such file"]),
        ([good, tmp_path / "pytorch-fid.npz", "--kid", *w], ["--save-stats", "kid"]),
        ([tmp_path / "pytorch-fid.npz", good, "--isc", *w], ["Inception Score"]),
        ([good, good, "--weights", tmp_path / "missing.pth"], ["missing.pth", "no such file"]),
        ([good, good, "--weights", tmp_path / "garbage.pth"], ["garbage.pth", "state dict"]),
        (["--save-stats", good, tmp_path / "keys.npz", *w], ["exists"]),
        (["--save-stats", good, tmp_path / "keys.npz" / "stats.npz", *w], ["cannot write"]),
        ([truncated, good, *w], ["000.png", "not a readable image"]),
    ]


def test_bad_inputs_are_one_clear_line(tmp_path, capsys, weights):
    for argv, words in bad_inputs(tmp_path, weights):
        one_line_error(argv, capsys, *words)


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        fid.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "Heusel" in out
    for flag in ("--kid", "--isc", "--prc", "--save-stats", "--data-root", "--weights", "--device", "--batch-size",
                 "--num-workers", "--features", "--train-features", "--cas", "--dataset", "--classifier", "--seed"):
        assert flag in out


def test_missing_weights_offline(tmp_path):
    """No --weights, nothing in the hub cache, no network: one line saying where to put the file."""
    a = write_folder(tmp_path / "a", images(2))
    env = {**OFFLINE_ENV, "TORCH_HOME": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, str(ROOT / "fid.py"), a, a], env=env, capture_output=True, text=True,
                          timeout=120)
    assert_clean_error(proc, "--weights", "pt_inception-2015-12-05-6726825d.pth", str(tmp_path / "hub"))


# ----------------------------------------------------------------------------------------------
# Classifier feature spaces and CAS, on the tiny synthetic space (4 quadrants, seconds to train)
# ----------------------------------------------------------------------------------------------
def silent(line):
    pass


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder holding the synthetic feature classifier, made as a user makes one."""
    folder = tmp_path_factory.mktemp("cache")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        fid.main(["--train-features", "synthetic", "--classifier", str(folder / "fid-synthetic.pt"),
                  "--device", "cpu", "--data-root", str(folder)])
    assert re.fullmatch(r"synthetic classifier: test accuracy \d+\.\d\d%, trained in \d+ s; saved to .*\n",
                        out.getvalue())
    assert os.listdir(folder) == ["fid-synthetic.pt"]  # written atomically: no temporary file left
    return folder


def labelled(n: int, seed: int):
    return common.synthetic_images(n, seed=seed, labels=True)


def test_classifier_training_is_seeded_and_deterministic():
    (x, y), (xt, yt) = labelled(128, 0), labelled(64, 1)
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    a, accuracy = fid.train_classifier(x, y, xt, yt, epochs=1, log=silent)
    assert torch.equal(torch.get_rng_state(), rng) and not torch.are_deterministic_algorithms_enabled()
    b, again = fid.train_classifier(x, y, xt, yt, epochs=1, log=silent)
    other, _ = fid.train_classifier(x, y, xt, yt, epochs=1, seed=1, log=silent)
    a, b, other = a.state_dict(), b.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and accuracy == again
    assert not torch.equal(a["body.0.weight"], other["body.0.weight"])


def test_accuracy_threshold_refuses_a_bad_classifier(tmp_path, monkeypatch, capsys):
    (x, y), (xt, yt) = labelled(128, 0), labelled(64, 1)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    with pytest.raises(fid.FIDError, match=r"^test accuracy \d+\.\d\d% is below the 85% .*another --seed$"):
        fid.train_classifier(x, shuffled, xt, yt, min_accuracy=0.85, epochs=1, log=silent)
    # the command line: one line, and nothing written to the cache
    monkeypatch.setenv("FID_CLASSIFIER_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(fid.MIN_ACCURACY, "synthetic", 1.01)
    with contextlib.redirect_stderr(io.StringIO()) as err:
        with pytest.raises(SystemExit) as stop:
            fid.main(["--train-features", "synthetic", "--device", "cpu", "--data-root", str(tmp_path)])
    last = err.getvalue().splitlines()[-1]  # after a progress line per epoch
    assert stop.value.code == 2 and last.startswith("error: test accuracy") and "below the 101%" in last
    assert os.listdir(tmp_path / "cache") == []


def test_classifier_sees_gray_28x28():
    """RGB -> L exactly as PIL's convert("L") (so gray images stay exactly themselves), other sizes -> 28x28
    as PIL's bilinear resize (antialiased: it widens the filter when it shrinks)."""
    rgb = images(4, size=(28, 28), seed=9)
    ours = fid.Classifier.prepare(torch.from_numpy(rgb).permute(0, 3, 1, 2))
    gray = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb])
    np.testing.assert_array_equal((ours[:, 0] * 255).round().numpy(), gray)
    gray = torch.from_numpy(gray)[:, None]
    assert torch.equal(fid.Classifier.prepare(gray), fid.Classifier.prepare(gray.expand(-1, 3, -1, -1)))
    assert torch.equal(fid.Classifier.prepare(gray), gray / 255)  # 28x28 gray: as it is
    big = images(4, size=(64, 50), seed=10)[..., 0]
    theirs = np.stack([np.asarray(Image.fromarray(image).resize((28, 28), Image.BILINEAR)) for image in big])
    ours = fid.Classifier.prepare(torch.from_numpy(big)[:, None])[:, 0] * 255
    assert np.abs(ours.numpy() - theirs).max() <= 1.0  # PIL rounds to uint8 after each of its two passes


def test_classifier_fid_is_zero_on_itself_and_grows_with_a_shift(cache):
    extractor = fid.feature_extractor("synthetic", "cpu", classifier=cache / "fid-synthetic.pt")
    x = common.synthetic_images(512, seed=3)
    ref = fid.statistics(fid.extract(extractor, [x])[0])
    distances = []
    for shift in (0, 8, 32, 96):  # grey added to every pixel
        f, _ = fid.extract(extractor, [(x.int() + shift).clamp(0, 255).to(torch.uint8)])
        s = fid.statistics(f)
        distances.append(fid.frechet_distance(s["mu"], s["sigma"], ref["mu"], ref["sigma"]))
    assert ref["mu"].shape == (128,) and abs(distances[0]) < 1e-6 * np.trace(ref["sigma"])
    assert 0 < distances[1] < distances[2] < distances[3], distances


def test_cas_of_real_images_and_of_shuffled_labels(tmp_path, cache, monkeypatch, capsys):
    """Real images (not the classifier's) passed as generated: CAS within noise of the real-data
    classifier's accuracy (64 test images: a standard error of ~5% each); shuffled labels: chance, 1/4."""
    monkeypatch.setenv("FID_CLASSIFIER_DIR", str(cache))
    x, y = labelled(256, 2)
    np.savez(tmp_path / "real.npz", images=x.permute(0, 2, 3, 1).numpy(), labels=y.numpy())
    fid.main(["--cas", str(tmp_path / "real.npz"), "--dataset", "synthetic", "--device", "cpu",
              "--data-root", str(tmp_path)])
    scores = scores_of(capsys.readouterr().out)
    assert list(scores) == ["cas", "real_accuracy"] and scores["real_accuracy"] > 0.6
    assert abs(scores["cas"] - scores["real_accuracy"]) < 0.15, scores
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    chance = fid.classification_accuracy_score(x, shuffled, "synthetic", str(tmp_path), device="cpu")
    assert abs(chance["cas"] - 0.25) < 0.15 and chance["real_accuracy"] == scores["real_accuracy"], chance
    capsys.readouterr()
    np.savez(tmp_path / "unlabelled.npz", images=x.numpy())
    np.savez(tmp_path / "nine.npz", images=x.numpy(), labels=np.full(len(x), 9))
    one_line_error(["--cas", tmp_path / "unlabelled.npz", "--dataset", "synthetic"], capsys, "no `labels`")
    one_line_error(["--cas", tmp_path / "nine.npz", "--dataset", "synthetic"], capsys, "label in 0..3", "9..9")
    one_line_error(["--cas", tmp_path / "real.npz"], capsys, "--cas needs --dataset")
    one_line_error(["--cas", tmp_path / "real.npz", "--dataset", "cifar10"], capsys,
                   "no classifier feature space for cifar10")


def test_missing_classifier_is_one_line_naming_its_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FID_CLASSIFIER_DIR", str(tmp_path / "cache"))
    a = tmp_path / "a.npz"
    np.savez(a, images=images(3), labels=np.arange(3))
    elsewhere = tmp_path / "elsewhere.pt"
    one_line_error([a, a, "--features", "fashion-mnist"], capsys, "error: no fashion-mnist feature classifier at "
                   f"{tmp_path / 'cache' / 'fid-fashion-mnist.pt'}: make it with "
                   "`python fid.py --train-features fashion-mnist`")
    one_line_error(["--cas", a, "--dataset", "mnist"], capsys, "`python fid.py --train-features mnist`")
    one_line_error([a, a, "--features", "mnist", "--classifier", elsewhere], capsys,
                   f"`python fid.py --train-features mnist --classifier {elsewhere}`")
    with pytest.raises(fid.FIDError, match="python fid.py --train-features fashion-mnist"):
        fid.feature_extractor("fashion-mnist", "cpu")  # where a training script fails early


def test_classifier_cache_folder(monkeypatch):
    monkeypatch.delenv("FID_CLASSIFIER_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", "/home/u")
    assert fid.classifier_path("mnist") == Path("/home/u/.cache/gen-models/fid-mnist.pt")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    assert fid.classifier_path("mnist") == Path("/xdg/gen-models/fid-mnist.pt")
    monkeypatch.setenv("FID_CLASSIFIER_DIR", "/shared/models")
    assert fid.classifier_path("fashion-mnist") == Path("/shared/models/fid-fashion-mnist.pt")


def test_statistics_record_their_feature_space(tmp_path, cache, monkeypatch, capsys):
    """--save-stats in a classifier's space records it (and the classifier); statistics of another space,
    or of another classifier, are refused in one line, and a cache of them is computed again."""
    monkeypatch.setenv("FID_CLASSIFIER_DIR", str(cache))
    x = common.synthetic_images(200, seed=4)
    images_npz, stats_npz, pytorch_fid_npz = tmp_path / "x.npz", tmp_path / "s.npz", tmp_path / "pfid.npz"
    np.savez(images_npz, images=x.numpy())  # N x 1 x H x W
    np.savez(pytorch_fid_npz, mu=np.zeros(2048), sigma=np.eye(2048))
    flags = ["--features", "synthetic", "--device", "cpu"]
    fid.main(["--save-stats", str(images_npz), str(stats_npz), *flags])
    stats = fid.load_stats(stats_npz)
    assert str(stats["space"]) == "synthetic" and str(stats["weights"]).startswith("sha256:")
    assert stats["mu"].shape == (128,) and stats["features"].shape == (200, 128)
    capsys.readouterr()
    fid.main([str(images_npz), str(stats_npz), "--kid", "--prc", *flags])  # images vs their own statistics
    scores = scores_of(capsys.readouterr().out)
    assert abs(scores["fid"]) < 1e-6 * np.trace(stats["sigma"]) and scores["precision"] == scores["recall"] == 1

    other = tmp_path / "other.pt"
    with contextlib.redirect_stderr(io.StringIO()):
        fid.main(["--train-features", "synthetic", "--classifier", str(other), "--seed", "1", "--device", "cpu",
                  "--data-root", str(tmp_path)])
    one_line_error([stats_npz, pytorch_fid_npz, *flags], capsys,
                   "pfid.npz: statistics in the inception feature space, not synthetic")
    one_line_error([stats_npz, pytorch_fid_npz], capsys,
                   "s.npz: statistics in the synthetic feature space, not inception: pass --features synthetic")
    one_line_error([images_npz, stats_npz, *flags, "--classifier", other], capsys,
                   "different synthetic classifiers", "this classifier: sha256:")
    fid.reference_stats(stats_npz, x, features="synthetic", classifier=other, device="cpu")
    assert "was computed with other synthetic weights" in capsys.readouterr().err
    assert fid.load_stats(stats_npz)["weights"] != stats["weights"]


# ----------------------------------------------------------------------------------------------
# Benchmark, on request: 2048-d equality with pytorch-fid and the speed of both
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.environ.get("FID_BENCHMARK"), reason="FID_BENCHMARK=1 to run")
def test_benchmark(tmp_path, monkeypatch, weights):
    """pytorch-fid and fid.py in turns, best of 3 or 4: the load of a shared machine varies."""
    from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance

    def race(theirs, ours, rounds=3):
        """Each in turn, `rounds` times: (values, best times) by name."""
        values, best = {}, {}
        for _ in range(rounds):
            for name, fn in (("pytorch-fid", theirs), ("fid.py", ours)):
                t0 = time.perf_counter()
                values[name] = fn()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
        return values, best

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    # Frechet distance on 2048-d statistics: full rank (n > d) and singular (n < d)
    for n in (5000, 1000):
        a, b = stats_of(gaussian_features(n, 2048, 0)), stats_of(gaussian_features(n, 2048, 1, shift=0.05))
        values, t = race(lambda: calculate_frechet_distance(*a, *b), lambda: fid.frechet_distance(*a, *b))
        diff = abs(values["fid.py"] - values["pytorch-fid"]) / values["pytorch-fid"]
        print(f"frechet 2048-d, n={n}: pytorch-fid {t['pytorch-fid']:.2f} s, fid.py {t['fid.py']:.2f} s "
              f"({t['pytorch-fid'] / t['fid.py']:.1f}x), relative difference {diff:.1e}")
        assert diff < 1e-6
    # feature extraction from the same 50 PNGs, batches of 25 (the first round also warms up)
    folder = write_folder(tmp_path / "png", images(50, size=(32, 32), seed=7))
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    net = pytorch_fid_network(monkeypatch, torch.load(weights))
    extractor = fid.feature_extractor("inception", "cpu", weights)
    source = fid.read_input(folder)["images"]
    values, t = race(lambda: calculate_activation_statistics(files, net, 25, 2048, "cpu", 2),
                     lambda: fid.statistics(fid.extract(extractor, fid._batches(source, 25, 2))[0]), rounds=4)
    print(f"features of 50 PNGs (32x32, batches of 25) on the CPU: pytorch-fid {50 / t['pytorch-fid']:.2f} "
          f"images/s, fid.py {50 / t['fid.py']:.2f} images/s")
    assert np.allclose(values["fid.py"]["mu"], values["pytorch-fid"][0], atol=1e-5)
