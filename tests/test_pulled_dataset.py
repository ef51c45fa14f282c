"""The torch Dataset over a pulled set: crops and flips keep image and mask aligned; DataLoader workers differ."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from conftest import collection, make_image_folder, square

pytestmark = pytest.mark.integration

SIDE = 200  # the image's pixel (r, c) holds r * SIDE + c, so every crop says where it came from


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """A pulled set (local pull of a real session) of one coordinate-coded uint16 image with two squares."""
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.pull import run_pull

    root = tmp_path_factory.mktemp("pulled_dataset")
    folder = root / "images"
    folder.mkdir()
    coords = (np.arange(SIDE)[:, None] * SIDE + np.arange(SIDE)[None, :]).astype(np.uint16)
    tifffile.imwrite(folder / "coords.tif", coords)
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="crops", classes=[{"name": "nucleus", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    image_id = next(r.image_id for r in provider.catalog.records())
    provider.save_annotation(info, image_id, annotator.annotator_id,
                             collection(square(20, 30, 40), square(120, 100, 60)))
    out = root / "pulled"
    run_pull(str(folder), out, session=info.session_id)
    mask = tifffile.imread(next((out / "tiff").glob("*_mask.tif")))
    assert mask.shape == (SIDE, SIDE) and mask.max() == 2
    return out, mask


def origin(image) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the source pixels of a crop of the coordinate-coded image (dtype scaling undone)."""
    code = np.rint(image[0].numpy().astype(np.float64) * 65535).astype(np.int64)
    return code // SIDE, code % SIDE


def test_crops_and_flips_move_the_mask_with_the_image(pulled):
    import torch

    from colabel.apps.pull import PulledDataset

    out, mask = pulled
    dataset = PulledDataset(out, crop=48, length=64, seed=3, normalize="dtype")
    assert isinstance(dataset, torch.utils.data.Dataset) and len(dataset) == 64
    flipped_rows = flipped_cols = 0
    for i in range(len(dataset)):
        image, labels = dataset[i]
        assert image.dtype == torch.float32 and tuple(image.shape) == (1, 48, 48)
        assert labels.dtype == torch.int64 and tuple(labels.shape) == (48, 48)
        rows, cols = origin(image)
        np.testing.assert_array_equal(labels.numpy(), mask[rows, cols])
        flipped_rows += bool(rows[0, 0] > rows[-1, 0])
        flipped_cols += bool(cols[0, 0] > cols[0, -1])
    assert 10 < flipped_rows < 54 and 10 < flipped_cols < 54  # each flip about half the time
    with pytest.raises(IndexError):
        dataset[64]


def test_dataloader_workers_do_not_repeat_each_others_crops(pulled):
    import torch
    from torch.utils.data import DataLoader

    from colabel.apps.pull import PulledDataset

    out, _ = pulled
    dataset = PulledDataset(out, crop=32, length=8, normalize="dtype")
    loader = DataLoader(dataset, batch_size=1, num_workers=2)
    torch.manual_seed(0)
    epochs = [[tuple(int(v) for v in (origin(image[0])[0].min(), origin(image[0])[1].min())) for image, _ in loader]
              for _ in range(2)]
    assert len(set(epochs[0])) == 8, epochs[0]  # two workers with one generator state would give 4
    assert epochs[0] != epochs[1]  # new workers, new seeds: a new epoch draws new crops


def test_percentile_scaling_spreads_a_narrow_range(pulled):
    from colabel.apps.pull import PulledDataset

    out, _ = pulled
    by_dtype = PulledDataset(out, crop=SIDE, normalize="dtype").pairs[0][0]
    by_percentile = PulledDataset(out, crop=SIDE, normalize="percentile").pairs[0][0]
    assert by_dtype.max() == pytest.approx((SIDE * SIDE - 1) / 65535)  # 0.61: the data use part of uint16
    lo, hi = np.percentile(by_percentile, (1, 99.8))
    assert lo == pytest.approx(0, abs=1e-4) and hi == pytest.approx(1, abs=1e-4)


def test_bad_settings_and_folders_are_refused_by_name(pulled, tmp_path):
    from colabel.apps.pull import PulledDataset
    from colabel.errors import InvalidInputError

    out, _ = pulled
    with pytest.raises(InvalidInputError, match="crop must be a positive integer"):
        PulledDataset(out, crop=0)
    with pytest.raises(InvalidInputError, match="normalize must be one of dtype, percentile"):
        PulledDataset(out, normalize="zscore")
    with pytest.raises(InvalidInputError, match="no labels.zarr"):
        PulledDataset(tmp_path)
    with pytest.raises(InvalidInputError, match="no labelled images by annotator 'nobody'"):
        PulledDataset(out, annotator="nobody")


def test_semantic_items_give_each_pixel_its_class_and_ignore_objects_without_one(tmp_path):
    """Three squares on the coordinate-coded image: nucleus, other and one never classified; ``masks="semantic"``
    items hold class index + 1 where the crop came from, and -100 (CrossEntropyLoss's ignore_index) on the third."""
    import torch

    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.pull import PulledDataset, run_pull
    from colabel.errors import InvalidInputError

    folder = tmp_path / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "coords.tif", (np.arange(SIDE)[:, None] * SIDE + np.arange(SIDE)).astype(np.uint16))
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="semantic", classes=[{"name": "nucleus", "color": "#ff0000"},
                                                                 {"name": "other", "color": "#0000ff"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    image_id = next(r.image_id for r in provider.catalog.records())
    provider.save_annotation(info, image_id, annotator.annotator_id, collection(
        square(20, 30, 40, "nucleus"), square(120, 100, 60, "other"), square(100, 10, 30, None)))
    run_pull(str(folder), tmp_path / "pulled", session=info.session_id)
    expected = np.zeros((SIDE, SIDE), np.int64)
    expected[30:70, 20:60], expected[100:160, 120:180], expected[10:40, 100:130] = 1, 2, -100

    dataset = PulledDataset(tmp_path / "pulled", crop=64, length=40, seed=1, normalize="dtype", masks="semantic")
    assert dataset.classes == ["nucleus", "other"]
    seen = set()
    for i in range(len(dataset)):
        image, target = dataset[i]
        rows, cols = origin(image)
        assert target.dtype == torch.int64
        np.testing.assert_array_equal(target.numpy(), expected[rows, cols])
        seen |= set(np.unique(target.numpy()).tolist())
    assert seen == {0, 1, 2, -100}
    loss = torch.nn.functional.cross_entropy(torch.zeros(1, 3, 64, 64), dataset[0][1][None])  # ignore_index -100
    assert torch.isfinite(loss)
    with pytest.raises(InvalidInputError, match="masks must be 'instances' or 'semantic', got 'classes'"):
        PulledDataset(tmp_path / "pulled", masks="classes")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A pulled set of the test images as they come: the 16-bit grey DSB2018 image (values 0-235 of uint16) and the
    RGB IHC and H&E images, each with two squares saved by one annotator."""
    from colabel.apps.provider.provider import DataProvider
    from colabel.apps.pull import run_pull

    root = tmp_path_factory.mktemp("pulled_mixed")
    folder = make_image_folder(root / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="mixed", classes=[{"name": "nucleus", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    names = {}
    for record in provider.catalog.records():
        if record.name != "broken.png":
            provider.save_annotation(info, record.image_id, annotator.annotator_id,
                                     collection(square(10, 10, 20), square(60, 40, 30)))
            names[record.image_id] = record.name
    out = root / "pulled"
    run_pull(str(folder), out, session=info.session_id)
    return out, names


def test_default_scaling_is_the_percentile_normalisation_training_uses(mixed):
    """The DSB2018 image holds 0-235 in uint16: divided by 65535 its brightest pixel would be 0.0036."""
    from colabel.apps.pull import PulledDataset, labelled_pairs
    from colabel.services.training.segmenter_training import normalize_image

    out, names = mixed
    dataset = PulledDataset(out, crop=64)
    index = [names[image_id] for image_id, _, _ in labelled_pairs(out)].index("dsb2018_nuclei.tif")
    stored = labelled_pairs(out)[index][1]
    assert stored.dtype == np.uint16 and stored.max() == 235
    image = dataset.pairs[index][0]
    np.testing.assert_allclose(image, np.moveaxis(normalize_image(stored), 0, -1))  # training's own function
    assert image.max() > 1.0 and np.percentile(image, 99.8) == pytest.approx(1, abs=1e-4)
    assert PulledDataset(out, crop=64, normalize="dtype").pairs[index][0].max() == pytest.approx(235 / 65535)


def test_channels_option_lets_a_dataloader_batch_grey_and_rgb_images(mixed):
    import torch
    from torch.utils.data import DataLoader

    from colabel.apps.pull import PulledDataset
    from colabel.errors import InvalidInputError

    out, names = mixed
    as_stored = PulledDataset(out, crop=64, length=3)
    assert sorted(image.shape[2] for image, _ in as_stored.pairs) == [1, 3, 3]
    with pytest.raises(RuntimeError):  # what channels=None leaves a mixed set with
        next(iter(DataLoader(as_stored, batch_size=3)))
    for channels in (3, 1):
        dataset = PulledDataset(out, crop=64, length=3, channels=channels)
        images, masks = next(iter(DataLoader(dataset, batch_size=3)))
        assert images.dtype == torch.float32 and tuple(images.shape) == (3, channels, 64, 64)
        assert tuple(masks.shape) == (3, 64, 64)
    dsb = [names[i] for i in as_stored.image_ids].index("dsb2018_nuclei.tif")
    grey = PulledDataset(out, crop=64, channels=3).pairs[dsb][0]
    for channel in range(3):  # grey repeated, as training does for the pretrained encoder
        np.testing.assert_array_equal(grey[..., channel], as_stored.pairs[dsb][0][..., 0])
    by_dtype = PulledDataset(out, crop=64, channels=3, normalize="dtype")
    assert all(image.shape[2] == 3 and image.dtype == np.float32 for image, _ in by_dtype.pairs)
    for bad in (2, 4, True, "rgb"):
        with pytest.raises(InvalidInputError, match="channels must be None"):
            PulledDataset(out, channels=bad)
