"""fid.py against pytorch-fid (network, pre-processing, Frechet distance), closed forms and direct
implementations of each metric, and the command line as a user runs it. Offline: random Inception weights.

The 2048-d comparison and the speed measurements run only when asked for:
    FID_BENCHMARK=1 python -m pytest -q -s tests/test_fid.py -k benchmark
"""
import os
import subprocess
import sys
import time
import warnings

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
    """Same PNG files, same random weights: pytorch-fid's loader, resize, scaling and network vs ours."""
    from pytorch_fid.fid_score import get_activations
    folder = write_folder(tmp_path / "png", images(3, size=(30, 40), seed=3))  # not square, not 299
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder))
    theirs = get_activations(files, pytorch_fid_network(monkeypatch, torch.load(weights)), batch_size=3,
                             dims=2048, device="cpu", num_workers=0)
    model = fid.load_inception(weights, "cpu")
    ours, _ = fid.extract(model, fid._batches(fid.read_input(folder)["images"], batch_size=3, num_workers=1))
    assert ours.std(0).mean() > 0.05  # the images do give different features
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


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
        return {k: str(v) for k, v in fid._record(given, source, weights, value_range).items()}

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
    """A built-in dataset named as A or B is its training split, as common.load_images gives it at its
    stored size, read from --data-root: the same statistics as those images written to an .npz."""
    load_images, calls = common.load_images, []

    def first_three(*args):  # 3 of the 256 synthetic images: seconds, not minutes, of Inception on a CPU
        calls.append(args)
        return load_images(*args)[:3]

    monkeypatch.setattr(common, "load_images", first_three)
    monkeypatch.chdir(tmp_path)
    flags = ["--weights", weights, "--device", "cpu", "--data-root", "root"]
    fid.main(["--save-stats", "synthetic", "named.npz", *flags])
    assert calls == [("synthetic", "root")]
    np.savez("images.npz", images=load_images("synthetic", "root", 28)[:3].permute(0, 2, 3, 1).numpy())
    fid.main(["--save-stats", "images.npz", "from-npz.npz", *flags])
    named, from_npz = fid.load_stats("named.npz"), fid.load_stats("from-npz.npz")
    for k in ("mu", "sigma", "features", "key"):
        np.testing.assert_array_equal(named[k], from_npz[k])
    # as A or B of a comparison (main reads both through _cli_input; its FID would cost a 2048-d eigh)
    assert torch.equal(fid._cli_input("synthetic", "root"), load_images("synthetic", "root", 28)[:3])
    assert calls[-1] == ("synthetic", "root")

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
        with pytest.raises(SystemExit) as stop:
            fid.main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        for word in words:
            assert word in err, (word, err)


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        fid.main(["--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0 and "Heusel" in out
    for flag in ("--kid", "--isc", "--prc", "--save-stats", "--data-root", "--weights", "--device", "--batch-size",
                 "--num-workers"):
        assert flag in out


def test_missing_weights_offline(tmp_path):
    """No --weights, nothing in the hub cache, no network: one line saying where to put the file."""
    a = write_folder(tmp_path / "a", images(2))
    env = {**OFFLINE_ENV, "TORCH_HOME": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, str(ROOT / "fid.py"), a, a], env=env, capture_output=True, text=True,
                          timeout=120)
    assert_clean_error(proc, "--weights", "pt_inception-2015-12-05-6726825d.pth", str(tmp_path / "hub"))


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
    model = fid.load_inception(weights, "cpu")
    source = fid.read_input(folder)["images"]
    values, t = race(lambda: calculate_activation_statistics(files, net, 25, 2048, "cpu", 2),
                     lambda: fid.statistics(fid.extract(model, fid._batches(source, 25, 2))[0]), rounds=4)
    print(f"features of 50 PNGs (32x32, batches of 25) on the CPU: pytorch-fid {50 / t['pytorch-fid']:.2f} "
          f"images/s, fid.py {50 / t['fid.py']:.2f} images/s")
    assert np.allclose(values["fid.py"]["mu"], values["pytorch-fid"][0], atol=1e-5)
