"""HoVer-Net: published layer names, strict checkpoint loading, geometry, post-processing, end to end.

No trained weights can be downloaded here, so the network runs with random weights (shapes and validity
only) and the pipeline around it is checked exactly with an "oracle" network that reads the answer from
its input with HoVer-Net's valid-padding geometry.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from colabel.apps.provider.annotations import validate_feature_collection
from colabel.errors import InvalidInputError, NotFoundError
from colabel.services.nuclei import aji, f1_at, segment_nuclei
from colabel.services.nuclei.metrics import overlaps

torch = pytest.importorskip("torch")

from colabel.services.nuclei import hovernet as hn  # noqa: E402

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"

# keys checked against the authors' tf_to_pytorch_variable_mapping.csv ("Pytorch-Fast" column, the
# naming of their released *_tf2pytorch.tar checkpoints) and models/hovernet/net_desc.py / net_utils.py
PUBLISHED_KEYS = [
    "conv0./.weight",
    "conv0.bn.running_var",
    "d0.units.0.conv1.weight",
    "d0.units.0.conv1/bn.weight",
    "d0.units.0.conv2/bn.running_mean",
    "d0.units.1.preact/bn.weight",
    "d0.units.2.conv3.weight",
    "d0.shortcut.weight",
    "d0.blk_bna.bn.running_mean",
    "d1.units.3.preact/bn.bias",
    "d2.units.5.conv2.weight",
    "d3.units.2.conv2/bn.running_var",
    "d3.shortcut.weight",
    "conv_bot.weight",
    "decoder.np.u3.conva.weight",
    "decoder.np.u3.dense.units.0.preact_bna/bn.weight",
    "decoder.np.u3.dense.units.0.conv1/bn.running_var",
    "decoder.np.u3.dense.units.7.conv2.weight",
    "decoder.np.u3.dense.blk_bna.bn.bias",
    "decoder.np.u3.convf.weight",
    "decoder.np.u2.dense.units.3.conv1.weight",
    "decoder.np.u2.convf.weight",
    "decoder.hv.u1.conva.weight",
    "decoder.hv.u0.bn.weight",
    "decoder.hv.u0.conv.bias",
    "upsample2x.unpool_mat",
]


@pytest.fixture(scope="module")
def fast6():
    return hn.build_hovernet(mode="fast", nr_types=6, seed=0)


# --------------------------------------------------------------------------------------------------
# architecture and checkpoints
# --------------------------------------------------------------------------------------------------


def test_state_dict_uses_the_published_names(fast6):
    keys = fast6.state_dict()
    for key in PUBLISHED_KEYS + ["decoder.tp.u0.conv.weight", "decoder.tp.u3.dense.units.4.conv2.weight"]:
        assert key in keys, key
    assert "d0.units.0.preact/bn.weight" not in keys  # the first unit of a group has no pre-activation
    assert list(fast6.decoder) == ["tp", "np", "hv"]
    shapes = {k: tuple(v.shape) for k, v in keys.items()}
    assert shapes["conv0./.weight"] == (64, 3, 7, 7)
    assert shapes["decoder.np.u3.conva.weight"] == (256, 1024, 3, 3)
    assert shapes["decoder.np.u3.dense.units.0.conv2.weight"] == (32, 32, 3, 3)  # grouped, split=4
    assert shapes["decoder.tp.u0.conv.weight"] == (6, 64, 1, 1)
    assert shapes["conv_bot.weight"] == (1024, 2048, 1, 1)
    original = hn.build_hovernet(mode="original").state_dict()
    assert not any(k.startswith("decoder.tp.") for k in original)
    assert set(PUBLISHED_KEYS) <= set(original)
    assert tuple(original["decoder.np.u3.conva.weight"].shape) == (256, 1024, 5, 5)


def test_random_model_reloads_strictly(fast6, tmp_path):
    state = {f"module.{k}": v for k, v in fast6.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "hovernet_fast_random.tar"
    torch.save({"desc": state, "epoch": 3}, path)
    loaded = hn.load_hovernet(path)
    assert (loaded.mode, loaded.nr_types) == ("fast", 6)
    for key, value in fast6.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_legacy_names_are_renamed():
    model = hn.build_hovernet(mode="original", seed=1)
    legacy = {}
    for key, value in model.state_dict().items():
        key = key.replace("conv0./.", "conv0.conv.").replace("preact_bna/bn", "preact_bn")
        key = key.replace("preact/bn", "preact_bn").replace("conv1/bn", "conv1_bn").replace("conv2/bn", "conv2_bn")
        legacy[key] = value
    fresh = hn.build_hovernet(mode="original", seed=2)
    hn.load_state_dict(fresh, {"desc": legacy})
    key = "d1.units.2.conv1/bn.weight"
    assert torch.equal(fresh.state_dict()[key], model.state_dict()[key])


def test_strict_loading_names_what_does_not_fit(fast6, tmp_path):
    state = dict(fast6.state_dict())
    del state["decoder.hv.u0.conv.bias"]
    state["decoder.xx.weight"] = torch.zeros(1)
    target = hn.build_hovernet(mode="fast", nr_types=6)
    expected = r"1 missing keys \(decoder\.hv\.u0\.conv\.bias\); 1 unexpected keys \(decoder\.xx\.weight\)"
    with pytest.raises(InvalidInputError, match=expected):
        hn.load_state_dict(target, state)
    expected = (
        r"2 shape mismatches \(decoder\.tp\.u0\.conv\.bias \(6,\) != \(5,\), "
        r"decoder\.tp\.u0\.conv\.weight \(6, 64, 1, 1\) != \(5, 64, 1, 1\)\)"
    )
    with pytest.raises(InvalidInputError, match=expected):
        hn.load_state_dict(hn.build_hovernet(mode="fast", nr_types=5), fast6.state_dict())
    # weights without the type branch: its 139 parameters and buffers are missing
    with pytest.raises(InvalidInputError, match=r"139 missing keys \(decoder\.tp\.u0"):
        hn.load_state_dict(hn.build_hovernet(mode="fast", nr_types=6), hn.build_hovernet(mode="fast").state_dict())
    with pytest.raises(NotFoundError, match="does not exist"):
        hn.load_hovernet(tmp_path / "missing.tar")
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(InvalidInputError, match="cannot be read as tensors"):
        hn.load_hovernet(garbage)


def test_urls_and_published_names_go_through_weights_fetch(fast6, tmp_path, monkeypatch):
    path = tmp_path / "downloaded.pth"
    torch.save(fast6.state_dict(), path)
    calls = []

    def fake_fetch(url, *, checksum, cache_dir=None, filename=None, progress=True, model=None, **_):
        calls.append((url, checksum, cache_dir, model))
        return path

    monkeypatch.setitem(sys.modules, "colabel.services.weights", types.SimpleNamespace(fetch=fake_fetch))
    assert hn.resolve_checkpoint("https://example.org/w.pth", checksum="sha256:" + "0" * 64, cache_dir=tmp_path) == path
    assert calls[-1] == ("https://example.org/w.pth", "sha256:" + "0" * 64, tmp_path, None)
    model = hn.load_hovernet("hovernet_pannuke_fast", progress=False)
    assert calls[-1][0] == "https://tiatoolbox.dcs.warwick.ac.uk/models/seg/hovernet_fast-pannuke.pth"
    assert calls[-1][3] == "hovernet_pannuke_fast"
    assert (model.mode, model.nr_types) == ("fast", 6)
    segmenter = hn.HoVerNetSegmenter(checkpoint="hovernet_pannuke_fast")
    assert segmenter.type_names[1] == "neoplastic" and segmenter.model_mpp == 0.25


def test_published_checkpoint_registry():
    assert {"hovernet_pannuke_fast", "hovernet_consep_original"} <= set(hn.HOVERNET_CHECKPOINTS)
    for name, info in hn.HOVERNET_CHECKPOINTS.items():
        assert info.url.startswith("https://") and info.mode in hn.MODES
        assert (info.nr_types is None) == (info.type_names is None)
        if info.nr_types:
            assert sorted(info.type_names) == list(range(info.nr_types))
        assert info.mode in name


@pytest.mark.parametrize("mode, nr_types", [("fast", None), ("original", 5)])
def test_forward_shapes(mode, nr_types):
    model = hn.build_hovernet(mode=mode, nr_types=nr_types, seed=0)
    size_in, size_out = hn.MODES[mode]
    with torch.inference_mode():
        out = model(torch.rand(1, 3, size_in, size_in) * 255)
    expected = {"np": 2, "hv": 2} | ({} if nr_types is None else {"tp": nr_types})
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (1, c, size_out, size_out) for k, c in expected.items()}


# --------------------------------------------------------------------------------------------------
# post-processing
# --------------------------------------------------------------------------------------------------


def touching_discs(shape=(164, 164)):
    labels = np.zeros(shape, np.int32)
    for i, (r, c, radius) in enumerate(
        [(40, 40, 14), (40, 64, 12), (60, 50, 11), (110, 110, 16), (118, 136, 13), (30, 130, 9), (130, 40, 10)], 1
    ):
        rr, cc = disk((r, c), radius, shape=shape)
        labels[rr, cc] = i
    return labels


def test_hv_maps_follow_the_authors_targets():
    labels = touching_discs()
    hv = hn.hv_maps_from_labels(labels)
    assert hv.shape == labels.shape + (2,) and hv.dtype == np.float32
    assert np.abs(hv).max() == 1.0 and not hv[labels == 0].any()
    rows, cols = np.nonzero(labels == 4)
    left, right = cols < cols.mean() - 2, cols > cols.mean() + 2
    assert (hv[rows[left], cols[left], 0] < 0).all() and (hv[rows[right], cols[right], 0] > 0).all()
    top = rows < rows.mean() - 2
    assert (hv[rows[top], cols[top], 1] < 0).all()


@pytest.mark.parametrize("noise", [0.0, 0.15])
def test_postprocessing_recovers_instances_from_synthetic_maps(noise):
    """Three mutually touching discs and four isolated ones; np = mask, hv from the labels (plus noise)."""
    labels = touching_discs()
    rng = np.random.default_rng(0)
    prob = np.clip((labels > 0) + rng.normal(0, noise, labels.shape), 0, 1)
    hv = hn.hv_maps_from_labels(labels) + rng.normal(0, noise / 2, labels.shape + (2,))
    out = hn.process_np_hv(prob, hv)
    table = overlaps(labels, out)
    best = np.zeros(len(table["gt_ids"]))
    np.maximum.at(best, table["pair_gt"], table["pair_iou"])
    assert len(table["pred_ids"]) == 7
    assert (best > 0.8).all(), best


def test_instance_types_majority_vote():
    labels = np.array([[1, 1, 1, 1, 0, 2, 2, 2, 2, 2]])
    kinds = np.array([[3, 3, 3, 1, 0, 0, 0, 0, 2, 4]])
    votes = hn.instance_types(labels, kinds)
    assert votes[1] == (3, 0.75)
    assert votes[2] == (2, 0.2)  # mostly background: the most frequent non-zero type wins (tie -> lowest)


# --------------------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------------------


class Oracle(torch.nn.Module):
    """Stands in for a trained HoVer-Net: decodes np / hv / tp from the image channels (red = 50 x type,
    green / blue = hv maps) and, like the real network, answers only for the centre of its input."""

    def __init__(self, mode="fast", nr_types=4):
        super().__init__()
        self.mode, self.nr_types = mode, nr_types
        self.decoder = torch.nn.ModuleDict({k: torch.nn.Identity() for k in ("tp", "np", "hv")})

    def forward(self, x):
        size_in, size_out = hn.MODES[self.mode]
        m = (size_in - size_out) // 2
        x = x[:, :, m : m + size_out, m : m + size_out]
        red = x[:, 0]
        nuclear = torch.where(red > 25, 10.0, -10.0)
        kinds = torch.clamp(torch.round(red / 50), 0, self.nr_types - 1).long()
        return {
            "tp": torch.nn.functional.one_hot(kinds, self.nr_types).permute(0, 3, 1, 2).float() * 10,
            "np": torch.stack([torch.zeros_like(nuclear), nuclear], 1),
            "hv": x[:, 1:3] / 127.5 - 1.0,
        }


@pytest.fixture(scope="module")
def oracle_scene():
    rng = np.random.default_rng(1)
    height, width = 300, 340
    labels = np.zeros((height, width), np.int32)
    kinds = {}
    for _ in range(60):
        r, c, radius = rng.integers(10, height - 10), rng.integers(10, width - 10), rng.integers(6, 12)
        rr, cc = disk((r, c), radius, shape=labels.shape)
        if (labels[rr, cc] > 0).mean() > 0.2:
            continue
        k = labels.max() + 1
        labels[rr, cc] = k
        kinds[k] = int(rng.integers(1, 4))
    type_map = np.zeros_like(labels)
    for k, kind in kinds.items():
        type_map[labels == k] = kind
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = type_map * 50
    image[..., 1:] = np.round((hn.hv_maps_from_labels(labels) + 1) * 127.5).clip(0, 255)
    return image, labels, kinds


@pytest.mark.parametrize("mode, tiling", [("fast", {}), ("original", {}), ("fast", {"tile_size": 128, "overlap": 48})])
def test_pipeline_with_an_oracle_network(oracle_scene, mode, tiling):
    """An off-by-one in the patch geometry shifts every nucleus and drops AJI to ~0.87."""
    image, labels, kinds = oracle_scene
    names = {0: "background", 1: "epithelial", 2: "immune", 3: "stromal"}
    segmenter = hn.HoVerNetSegmenter(model=Oracle(mode), type_names=names)
    result = segment_nuclei(image, backend=segmenter, **tiling)
    assert len(result.nuclei) == labels.max()
    assert aji(labels, result.labels) > 0.97
    table = overlaps(labels, result.labels)
    ok = table["pair_iou"] > 0.5
    for g, p in zip(table["pair_gt"][ok], table["pair_pred"][ok], strict=True):
        nucleus = result.nuclei[int(table["pred_ids"][p]) - 1]
        assert nucleus.type == kinds[int(table["gt_ids"][g])] and nucleus.type_prob > 0.9
    fc = validate_feature_collection(result.to_geojson(), image_shape=image.shape[:2])
    assert {f["properties"]["classification"]["name"] for f in fc["features"]} == {"epithelial", "immune", "stromal"}


def test_images_at_another_resolution_are_resized_for_the_network(oracle_scene):
    image, labels, _ = oracle_scene
    segmenter = hn.HoVerNetSegmenter(model=Oracle(), model_mpp=0.25)
    result = segment_nuclei(image, backend=segmenter, mpp=0.5)  # the network sees the image 2x larger
    assert result.labels.shape == labels.shape
    assert f1_at(labels, result.labels) > 0.95


def test_random_weights_end_to_end_on_a_crop_of_two_patches(monkeypatch):
    """Random weights: the output is meaningless (here no marker survives the post-processing, so no
    nucleus), so only types, shapes, ranges and validity are checked; the oracle tests above check the
    same pipeline with answers. The 250 x 150 px crop takes two of the network's 164 px output patches."""
    image = np.asarray(Image.open(DATA / "ihc_ki67.png").convert("RGB"))
    maps = []
    predict = hn.predict_maps
    monkeypatch.setattr(hn, "predict_maps", lambda *a, **k: maps.append(predict(*a, **k)) or maps[-1])
    result = segment_nuclei(
        image, backend="hovernet", backend_options={"nr_types": 6, "seed": 0}, region=(100, 50, 250, 150)
    )
    (raw,) = maps
    assert raw["np"].shape == (150, 250) and raw["hv"].shape == (150, 250, 2) and raw["tp"].shape == (150, 250, 6)
    assert 0 <= raw["np"].min() and raw["np"].max() <= 1 and np.isfinite(raw["hv"]).all()
    assert np.allclose(raw["tp"].sum(axis=-1), 1, atol=1e-4)
    assert result.backend == "hovernet"
    assert result.labels.shape == (150, 250) and result.labels.dtype == np.uint32
    assert result.origin == (100, 50) and result.image_shape == (512, 512)
    assert result.type_names == {0: "background"} | {t: f"type {t}" for t in range(1, 6)}
    assert int(result.labels.max()) == len(result.nuclei)
    for nucleus in result.nuclei:
        assert 0 <= nucleus.type < 6 and 0 < nucleus.type_prob <= 1
        x0, y0, x1, y1 = nucleus.bbox
        assert 100 <= x0 < x1 <= 350 and 50 <= y0 < y1 <= 200
    validate_feature_collection(result.to_geojson(), image_shape=image.shape[:2])
    info = hn.HoVerNetSegmenter(model=Oracle()).info()
    assert info["patch_input"] == 256 and info["patch_output"] == 164


def test_a_service_refuses_a_backend_that_needs_weights_it_was_not_configured_with(fast6, tmp_path, caplog):
    from colabel.services.nuclei.base import backend_needs_weights
    from colabel.services.nuclei.service import NucleiService

    assert backend_needs_weights("hovernet") and not backend_needs_weights("classical")
    image = np.zeros((64, 64, 3), np.uint8)
    service = NucleiService()  # classical by default, as `colabel serve` starts it
    with pytest.raises(InvalidInputError, match="nucleus backend 'hovernet' is not configured on this service"):
        service.segment(image, None, "hovernet", None, False)
    assert service._backends == {} and "random weights" not in caplog.text  # nothing built
    assert service.segment(image, None, "classical", None, False)["count"] == 0
    # the default backend with its checkpoint is what it was configured for
    path = tmp_path / "hovernet.pth"
    torch.save(fast6.state_dict(), path)
    configured = NucleiService(backend="hovernet", backend_options={"checkpoint": str(path)})
    assert configured._backend(None) is configured._backend("hovernet")
    assert configured._backend("classical").name == "classical"  # needs no weights: built with no options
