"""ImageCatalog on real images and on edge cases written from them into a temporary folder."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from PIL import Image

from colabel.apps.provider.images import ImageCatalog, ImageRecord, block_mean, image_id_for
from colabel.apps.provider.models import ImageInfo, Region
from colabel.errors import InvalidInputError, NotFoundError, PayloadTooLargeError, UnreadableImageError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data"
NUCLEI = tifffile.imread(DATA / "dsb2018_nuclei.tif")  # (512, 512) uint16
MASK = tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")  # (512, 512) uint16 labels
IHC = iio.imread(DATA / "ihc_ki67.png")  # (512, 512, 3) uint8
HE = iio.imread(DATA / "he_histo.jpg")  # (300, 500, 3) uint8


def reference_block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Independent reference: NaN-pad to whole blocks, nanmean, round, cast back."""
    h, w, c = image.shape
    ph, pw = -h % factor, -w % factor
    padded = np.pad(image.astype(np.float64), ((0, ph), (0, pw), (0, 0)), constant_values=np.nan)
    blocks = padded.reshape((h + ph) // factor, factor, (w + pw) // factor, factor, c)
    mean = np.nanmean(blocks, axis=(1, 3))
    return np.rint(mean).astype(image.dtype) if image.dtype.kind in "ui" else mean.astype(image.dtype)


def by_name(catalog: ImageCatalog) -> dict[str, ImageRecord]:
    return {r.name: r for r in catalog.records()}


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A mounted folder of the real images and the edge cases, written once per module."""
    root = tmp_path_factory.mktemp("mounted")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("dsb2018_nuclei.tif", "dsb2018_nuclei_mask.tif", "ihc_ki67.png", "he_histo.jpg"):
        shutil.copy(DATA / name, root / name)

    nuclei16 = (NUCLEI.astype(np.uint32) * 250 + 7).astype(np.uint16)  # values up to 58757: needs 16 bits
    edge = root / "edge"
    edge.mkdir()
    tifffile.imwrite(edge / "grey16_tiled.tif", nuclei16, tile=(128, 128), compression="zlib")
    tifffile.imwrite(edge / "grey16_bigendian.tif", nuclei16, byteorder=">")
    tifffile.imwrite(edge / "float32.tif", NUCLEI.astype(np.float32) / 235.0)
    tifffile.imwrite(edge / "nonsquare.tif", NUCLEI[:300, :450])
    tall = np.tile(NUCLEI, (3, 2))[:1025, :700]  # (1025, 700), odd height
    tifffile.imwrite(edge / "tall_1025x700.tif", tall)
    tifffile.imwrite(edge / "rgb.tif", IHC, photometric="rgb")
    channel_first = np.stack([NUCLEI, MASK, NUCLEI[::-1]])  # (3, 512, 512)
    tifffile.imwrite(edge / "channel_first.tif", channel_first, photometric="minisblack")
    stack20 = np.stack([NUCLEI[:64, :64] + i for i in range(20)])
    tifffile.imwrite(edge / "stack20.tif", stack20, photometric="minisblack")
    tifffile.imwrite(edge / "cyx.ome.tif", channel_first, metadata={"axes": "CYX"})
    zcyx = np.stack([channel_first[:, :256, :256], channel_first[:, 256:, 256:]])  # (Z=2, C=3, 256, 256)
    tifffile.imwrite(edge / "zcyx.ome.tif", zcyx, metadata={"axes": "ZCYX"})
    with tifffile.TiffWriter(edge / "pyramid.ome.tif") as tif:
        base = np.stack([NUCLEI, MASK])  # (2, 512, 512)
        tif.write(base, subifds=2, tile=(128, 128), compression="zlib", metadata={"axes": "CYX"})
        tif.write(base[:, ::2, ::2], subfiletype=1, tile=(128, 128), compression="zlib")
        tif.write(base[:, ::4, ::4], subfiletype=1, tile=(128, 128), compression="zlib")
    # OME-XML in a file not named .ome.tif
    tifffile.imwrite(edge / "ome_inside.tif", channel_first[:2], ome=True, metadata={"axes": "CYX"})

    pngs = root / "png"
    pngs.mkdir()
    iio.imwrite(pngs / "grey16.png", nuclei16)
    iio.imwrite(pngs / "grey8.png", (NUCLEI.astype(np.uint16) * 255 // 235).astype(np.uint8))
    Image.fromarray(IHC).convert("P", palette=Image.Palette.ADAPTIVE, colors=32).save(pngs / "palette.png")
    iio.imwrite(pngs / "rgba.png", np.dstack([IHC, (MASK > 0).astype(np.uint8) * 255]))
    wide = np.tile(IHC, (1, 3, 1))[:, :1030]  # (512, 1030, 3)
    iio.imwrite(pngs / "wide_512x1030.png", wide)
    shutil.copy(DATA / "ihc_ki67.png", pngs / "UPPER.PNG")
    shutil.copy(DATA / "he_histo.jpg", pngs / "upper.JPEG")

    bad = root / "bad"
    bad.mkdir()
    raw = (DATA / "dsb2018_nuclei.tif").read_bytes()
    (bad / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    (bad / "header_only.tif").write_bytes(raw[:4])
    (bad / "garbage.png").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    png = (DATA / "ihc_ki67.png").read_bytes()
    (bad / "truncated.png").write_bytes(png[: len(png) // 2])  # valid header, cut pixel data
    jpg = (DATA / "he_histo.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    (bad / "text.tif").write_text("not an image")

    shutil.copy(DATA / "ihc_ki67.png", outside / "secret.png")
    shutil.copy(DATA / "dsb2018_nuclei.tif", outside / "secret.tif")
    (root / "links").mkdir()
    os.symlink(outside / "secret.png", root / "links" / "outside.png")
    os.symlink(outside / "secret.tif", root / "links" / "outside.tif")
    os.symlink(Path("..") / "dsb2018_nuclei.tif", root / "links" / "inside.tif")
    os.symlink(root / "missing.tif", root / "links" / "dangling.tif")
    os.symlink(outside, root / "linked_dir")  # a folder link: not followed

    # not listed
    (root / "notes.txt").write_text("hello")
    np.save(root / "array.npy", NUCLEI)
    shutil.copy(DATA / "ihc_ki67.png", root / ".hidden.png")
    (root / ".cache").mkdir()
    shutil.copy(DATA / "ihc_ki67.png", root / ".cache" / "thumb.png")
    (root / "annotations").mkdir()
    shutil.copy(DATA / "dsb2018_nuclei_mask.tif", root / "annotations" / "labels.tif")
    # a nested folder called annotations is not top-level: listed
    (edge / "annotations").mkdir()
    shutil.copy(DATA / "he_histo.jpg", edge / "annotations" / "nested.jpg")
    return root


@pytest.fixture(scope="module")
def catalog(folder) -> ImageCatalog:
    return ImageCatalog(folder)


@pytest.fixture(scope="module")
def records(catalog) -> dict[str, ImageRecord]:
    return by_name(catalog)


def read(catalog: ImageCatalog, records: dict[str, ImageRecord], name: str, **kwargs) -> np.ndarray:
    return catalog.read(records[name].image_id, **kwargs)


# ----------------------------------------------------------------------------- the shipped data


def test_shipped_data_are_the_documented_images():
    assert NUCLEI.shape == (512, 512) and NUCLEI.dtype == np.uint16
    assert MASK.shape == (512, 512) and MASK.dtype == np.uint16
    assert len(np.unique(MASK)) - 1 == 125
    assert IHC.shape == (512, 512, 3) and IHC.dtype == np.uint8
    assert HE.shape == (300, 500, 3) and HE.dtype == np.uint8
    licence = (DATA / "LICENSE.md").read_text()
    for path in DATA.iterdir():
        if path.name != "LICENSE.md":
            assert path.stat().st_size < 2**20
            assert f"`{path.name}`" in licence


# ----------------------------------------------------------------------------- listing


def test_listing_has_images_only_sorted_and_skips_hidden_excluded_and_linked_folders(catalog):
    names = [r.name for r in catalog.records()]
    assert names == sorted(names)
    assert "dsb2018_nuclei.tif" in names and "png/UPPER.PNG" in names and "png/upper.JPEG" in names
    assert "edge/annotations/nested.jpg" in names
    for absent in ("notes.txt", "array.npy", ".hidden.png", ".cache/thumb.png", "annotations/labels.tif"):
        assert absent not in names
    assert not any(n.startswith("linked_dir/") for n in names)
    assert len(catalog) == len(names) == len(set(r.image_id for r in catalog.records()))


def test_image_id_is_opaque_hash_of_relative_posix_path(catalog, records):
    record = records["edge/grey16_tiled.tif"]
    expected = "img-" + hashlib.sha256(b"edge/grey16_tiled.tif").hexdigest()[:16]
    assert record.image_id == expected == image_id_for("edge/grey16_tiled.tif")
    assert all(re.fullmatch(r"img-[0-9a-f]{16}", r.image_id) for r in catalog.records())
    assert record.image_id in catalog and "edge/grey16_tiled.tif" not in catalog and 42 not in catalog


def test_ids_are_stable_across_catalogs_of_the_same_folder(folder, catalog):
    assert [r.image_id for r in ImageCatalog(folder).records()] == [r.image_id for r in catalog.records()]


def test_exclude_names_top_level_folders(folder):
    names = {r.name for r in ImageCatalog(folder, exclude=("edge", "png", "bad")).records()}
    assert "annotations/labels.tif" in names
    assert not any(n.startswith(("edge/", "png/", "bad/")) for n in names)
    assert "annotations/labels.tif" in {r.name for r in ImageCatalog(folder, exclude="edge").records()}


def test_refresh_lists_new_files_and_forgets_removed_ones(tmp_path):
    shutil.copy(DATA / "ihc_ki67.png", tmp_path / "a.png")
    catalog = ImageCatalog(tmp_path)
    assert [r.name for r in catalog.records()] == ["a.png"]
    shutil.copy(DATA / "he_histo.jpg", tmp_path / "b.jpg")
    (tmp_path / "a.png").unlink()
    assert [r.name for r in catalog.records()] == ["a.png"]  # not before refresh
    catalog.refresh()
    assert [r.name for r in catalog.records()] == ["b.jpg"]
    with pytest.raises(NotFoundError):
        catalog.get(image_id_for("a.png"))


def test_record_info_is_the_wire_model_without_the_path(records):
    info = records["dsb2018_nuclei.tif"].info()
    assert isinstance(info, ImageInfo)
    st = records["dsb2018_nuclei.tif"].path.stat()
    assert info.model_dump(mode="json") == {
        "image_id": records["dsb2018_nuclei.tif"].image_id,
        "name": "dsb2018_nuclei.tif",
        "format": "tiff",
        "shape": [512, 512, 1],
        "dtype": "uint16",
        "channels": 1,
        "levels": [[512, 512]],
        "error": None,
        "revision": f"{st.st_size:x}-{st.st_mtime_ns:x}",
        "status": "unannotated",
        "annotations": {},
        "finished": {},
        "returned": {},
    }
    broken = records["bad/garbage.png"].info()
    assert broken.status == "unreadable" and broken.error and broken.shape is None and broken.levels == []
    assert broken.revision is None
    dumped = str(records["links/outside.png"].info().model_dump(mode="json"))
    assert "secret" not in dumped and str(records["links/outside.png"].path) not in dumped


# ----------------------------------------------------------------------------- constructor


def test_missing_folder_is_rejected_with_a_sentence(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        ImageCatalog(tmp_path / "nope")


def test_file_instead_of_folder_is_rejected(tmp_path):
    (tmp_path / "f.png").write_bytes(b"x")
    with pytest.raises(InvalidInputError, match="is not a folder"):
        ImageCatalog(tmp_path / "f.png")


def test_unlistable_folder_is_rejected(tmp_path, monkeypatch):
    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(os, "scandir", denied)
    with pytest.raises(InvalidInputError, match="cannot be read"):
        ImageCatalog(tmp_path)


# ----------------------------------------------------------------------------- get


@pytest.mark.parametrize(
    "image_id", ["img-0000000000000000", "../x", "/etc/passwd", "dsb2018_nuclei.tif", "", "img-" + "a" * 200]
)
def test_get_of_anything_not_listed_is_not_found(catalog, image_id):
    with pytest.raises(NotFoundError) as info:
        catalog.get(image_id)
    assert str(info.value).startswith("unknown image id '")
    assert isinstance(info.value, KeyError)


def test_get_names_the_unknown_id(catalog):
    with pytest.raises(NotFoundError, match=r"^unknown image id '\.\./x'$"):
        catalog.get("../x")


@pytest.mark.parametrize("image_id", [None, 3, b"img-0", ["img-0"]])
def test_get_of_a_non_string_is_invalid_input(catalog, image_id):
    with pytest.raises(InvalidInputError, match="must be a string"):
        catalog.get(image_id)


# ----------------------------------------------------------------------------- pixels and axes


def test_grey_uint16_tiff_is_returned_h_w_1_with_identical_pixels(catalog, records):
    record = records["dsb2018_nuclei.tif"]
    assert (record.format, record.shape, record.dtype) == ("tiff", (512, 512, 1), "uint16")
    out = read(catalog, records, "dsb2018_nuclei.tif")
    assert out.shape == (512, 512, 1) and out.dtype == np.uint16 and out.flags.c_contiguous
    np.testing.assert_array_equal(out[..., 0], NUCLEI)


@pytest.mark.parametrize("name", ["edge/grey16_tiled.tif", "edge/grey16_bigendian.tif"])
def test_16bit_tiff_keeps_uint16_values_above_255(catalog, records, name):
    out = read(catalog, records, name)
    assert out.dtype == np.uint16 and out.dtype.isnative and out.max() > 255
    np.testing.assert_array_equal(out[..., 0], tifffile.imread(records[name].path))


def test_float_tiff_keeps_float32(catalog, records):
    out = read(catalog, records, "edge/float32.tif")
    assert records["edge/float32.tif"].dtype == "float32" and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 0], NUCLEI.astype(np.float32) / 235.0)


def test_non_square_tiff_keeps_height_then_width(catalog, records):
    assert records["edge/nonsquare.tif"].shape == (300, 450, 1)
    np.testing.assert_array_equal(read(catalog, records, "edge/nonsquare.tif")[..., 0], NUCLEI[:300, :450])


def test_rgb_tiff_is_returned_h_w_3(catalog, records):
    np.testing.assert_array_equal(read(catalog, records, "edge/rgb.tif"), IHC)


def test_channel_first_tiff_is_returned_channels_last(catalog, records):
    record = records["edge/channel_first.tif"]
    assert record.shape == (512, 512, 3)
    out = read(catalog, records, "edge/channel_first.tif")
    np.testing.assert_array_equal(out, np.stack([NUCLEI, MASK, NUCLEI[::-1]], axis=-1))


def test_stack_of_more_than_16_planes_serves_its_first_plane(catalog, records):
    assert records["edge/stack20.tif"].shape == (64, 64, 1)
    np.testing.assert_array_equal(read(catalog, records, "edge/stack20.tif")[..., 0], NUCLEI[:64, :64])


def test_ome_tiff_cyx_uses_its_axes(catalog, records):
    record = records["edge/cyx.ome.tif"]
    assert (record.format, record.shape) == ("ome-tiff", (512, 512, 3))
    expected = np.stack([NUCLEI, MASK, NUCLEI[::-1]], -1)
    np.testing.assert_array_equal(read(catalog, records, "edge/cyx.ome.tif"), expected)


def test_ome_tiff_zcyx_serves_z_index_0(catalog, records):
    record = records["edge/zcyx.ome.tif"]
    assert record.shape == (256, 256, 3)
    expected = np.stack([NUCLEI, MASK, NUCLEI[::-1]], -1)[:256, :256]
    np.testing.assert_array_equal(read(catalog, records, "edge/zcyx.ome.tif"), expected)


def test_ome_metadata_is_detected_without_the_ome_suffix(catalog, records):
    record = records["edge/ome_inside.tif"]
    assert (record.format, record.shape) == ("ome-tiff", (512, 512, 2))
    np.testing.assert_array_equal(read(catalog, records, "edge/ome_inside.tif"), np.stack([NUCLEI, MASK], -1))


def test_imagej_hyperstack_keeps_channels_and_takes_t0_z0(tmp_path):
    cyx = np.stack([NUCLEI, MASK, NUCLEI // 2])[:, :200, :300]
    tzcyx = np.stack([np.stack([cyx] * 2)] * 2)  # (2, 2, 3, 200, 300)
    tzcyx[0, 1] += 1  # z=1 and t=1 differ from t=0, z=0
    tzcyx[1] += 2
    tifffile.imwrite(tmp_path / "hyper.tif", tzcyx, imagej=True, metadata={"axes": "TZCYX"})
    catalog = ImageCatalog(tmp_path)
    [record] = catalog.records()
    assert record.shape == (200, 300, 3)
    np.testing.assert_array_equal(catalog.read(record.image_id), np.moveaxis(tzcyx[0, 0], 0, -1))


def test_multipage_rgb_tiff_serves_its_first_page(tmp_path):
    pages = np.stack([IHC[:100, :120], IHC[100:200, :120], IHC[200:300, :120]])  # (3, 100, 120, 3)
    tifffile.imwrite(tmp_path / "pages.tif", pages, photometric="rgb")
    catalog = ImageCatalog(tmp_path)
    [record] = catalog.records()
    assert record.shape == (100, 120, 3)
    np.testing.assert_array_equal(catalog.read(record.image_id), pages[0])


def test_tiff_needing_a_missing_codec_is_listed_with_an_error(tmp_path):
    if 5 in tifffile.TIFF.DECOMPRESSORS:
        pytest.skip("imagecodecs is installed: LZW can be decoded")
    Image.fromarray(IHC).save(tmp_path / "lzw.tif", compression="tiff_lzw")
    [record] = ImageCatalog(tmp_path).records()
    assert record.error == "'lzw.tif' is LZW-compressed, which needs the imagecodecs package"


def test_rgb_png_and_jpeg_match_imageio(catalog, records):
    assert records["ihc_ki67.png"].format == "png" and records["he_histo.jpg"].format == "jpeg"
    np.testing.assert_array_equal(read(catalog, records, "ihc_ki67.png"), IHC)
    np.testing.assert_array_equal(read(catalog, records, "he_histo.jpg"), HE)
    assert records["he_histo.jpg"].shape == (300, 500, 3)


def test_upper_case_extensions_are_listed_and_read(catalog, records):
    np.testing.assert_array_equal(read(catalog, records, "png/UPPER.PNG"), IHC)
    np.testing.assert_array_equal(read(catalog, records, "png/upper.JPEG"), HE)


def test_16bit_png_keeps_uint16(catalog, records):
    record = records["png/grey16.png"]
    assert (record.shape, record.dtype) == ((512, 512, 1), "uint16")
    out = read(catalog, records, "png/grey16.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out[..., 0], (NUCLEI.astype(np.uint32) * 250 + 7).astype(np.uint16))


def test_grey_png_is_returned_h_w_1(catalog, records):
    assert records["png/grey8.png"].shape == (512, 512, 1)
    expected = iio.imread(records["png/grey8.png"].path)
    np.testing.assert_array_equal(read(catalog, records, "png/grey8.png")[..., 0], expected)


def test_palette_png_is_returned_rgb(catalog, records):
    record = records["png/palette.png"]
    with Image.open(record.path) as image:
        assert image.mode == "P"
        expected = np.asarray(image.convert("RGB"))
    assert (record.shape, record.dtype) == ((512, 512, 3), "uint8")
    np.testing.assert_array_equal(read(catalog, records, "png/palette.png"), expected)


def test_rgba_png_keeps_four_channels(catalog, records):
    out = read(catalog, records, "png/rgba.png")
    assert out.shape == (512, 512, 4)
    np.testing.assert_array_equal(out, iio.imread(records["png/rgba.png"].path))


# ----------------------------------------------------------------------------- regions


def test_region_is_in_pixels_x_columns_y_rows(catalog, records):
    out = read(catalog, records, "dsb2018_nuclei.tif", region=Region(x=100, y=40, width=70, height=30))
    assert out.shape == (30, 70, 1)
    np.testing.assert_array_equal(out[..., 0], NUCLEI[40:70, 100:170])


@pytest.mark.parametrize(
    "name",
    ["edge/grey16_tiled.tif", "edge/grey16_bigendian.tif", "edge/channel_first.tif", "edge/zcyx.ome.tif",
     "ihc_ki67.png", "he_histo.jpg"],
)
def test_region_equals_crop_of_whole_image(catalog, records, name):
    whole = read(catalog, records, name)
    region = {"x": 13, "y": 21, "width": 101, "height": 57}
    np.testing.assert_array_equal(read(catalog, records, name, region=region), whole[21:78, 13:114])


def test_region_touching_the_far_corner_is_allowed(catalog, records):
    out = read(catalog, records, "he_histo.jpg", region={"x": 499, "y": 299, "width": 1, "height": 1})
    np.testing.assert_array_equal(out, HE[299:300, 499:500])


@pytest.mark.parametrize("name", ["dsb2018_nuclei.tif", "edge/grey16_tiled.tif", "edge/pyramid.ome.tif"])
def test_tiff_region_is_read_without_decoding_the_whole_image(catalog, records, monkeypatch, name):
    if name != "dsb2018_nuclei.tif":  # uncompressed strips are memory-mapped; tiles need zarr
        pytest.importorskip("zarr")
    expected = read(catalog, records, name)[6:14, 5:12]

    def whole(*args, **kwargs):
        raise AssertionError("whole image decoded")

    monkeypatch.setattr(tifffile.TiffPageSeries, "asarray", whole)
    monkeypatch.setattr(tifffile.TiffFile, "asarray", whole)
    out = read(catalog, records, name, region={"x": 5, "y": 6, "width": 7, "height": 8})
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("name", ["edge/grey16_tiled.tif", "edge/pyramid.ome.tif", "edge/zcyx.ome.tif"])
def test_tiff_regions_and_levels_are_right_without_zarr(catalog, records, monkeypatch, name):
    import sys

    level = len(records[name].levels) - 1
    expected = read(catalog, records, name, level=level)
    monkeypatch.setitem(sys.modules, "zarr", None)  # import zarr -> ImportError
    np.testing.assert_array_equal(read(catalog, records, name, level=level), expected)
    region = {"x": 3, "y": 4, "width": 20, "height": 10}
    np.testing.assert_array_equal(read(catalog, records, name, level=level, region=region), expected[4:14, 3:23])


@pytest.mark.parametrize(
    "region",
    [{"x": 450, "y": 0, "width": 51, "height": 10}, {"x": 0, "y": 290, "width": 5, "height": 11},
     {"x": 500, "y": 0, "width": 1, "height": 1}],
)
def test_region_outside_the_image_is_invalid_and_names_region_and_size(catalog, records, region):
    with pytest.raises(InvalidInputError) as info:
        read(catalog, records, "he_histo.jpg", region=region)
    message = str(info.value)
    assert f"x={region['x']}" in message and f"width={region['width']}" in message
    assert "500 pixels wide and 300 high" in message and "he_histo.jpg" in message


@pytest.mark.parametrize(
    "region", [{"x": -1, "y": 0, "width": 5, "height": 5}, {"x": 0, "y": 0, "width": 0, "height": 5},
               {"x": 0, "y": 0}, {"x": "a", "y": 0, "width": 5, "height": 5}, [0, 0, 5, 5]],
)
def test_malformed_region_is_invalid_input(catalog, records, region):
    with pytest.raises(InvalidInputError, match="region"):
        read(catalog, records, "he_histo.jpg", region=region)


# ----------------------------------------------------------------------------- levels


def test_image_up_to_512_pixels_has_level_0_only(records):
    assert records["ihc_ki67.png"].levels == ((512, 512),)
    assert records["he_histo.jpg"].levels == ((300, 500),)


def test_computed_levels_halve_until_512_and_average_blocks(catalog, records):
    record = records["edge/tall_1025x700.tif"]
    assert record.levels == ((1025, 700), (513, 350), (257, 175))
    full = read(catalog, records, "edge/tall_1025x700.tif")
    for level, factor in ((1, 2), (2, 4)):
        out = read(catalog, records, "edge/tall_1025x700.tif", level=level)
        assert out.shape == (*record.levels[level], 1) and out.dtype == np.uint16
        np.testing.assert_array_equal(out, reference_block_mean(full, factor))


def test_computed_levels_of_png_keep_uint8_and_channels(catalog, records):
    record = records["png/wide_512x1030.png"]
    assert record.levels == ((512, 1030), (256, 515), (128, 258))  # 515 > 512: one more level
    full = iio.imread(record.path)
    for level, factor in ((1, 2), (2, 4)):
        out = read(catalog, records, "png/wide_512x1030.png", level=level)
        assert out.dtype == np.uint8 and out.shape == (*record.levels[level], 3)
        np.testing.assert_array_equal(out, reference_block_mean(full, factor))


def test_region_of_a_computed_level_equals_crop_of_that_level(catalog, records):
    name = "edge/tall_1025x700.tif"
    level2 = read(catalog, records, name, level=2)
    region = {"x": 170, "y": 250, "width": 5, "height": 7}  # the partial bottom/right blocks
    np.testing.assert_array_equal(read(catalog, records, name, level=2, region=region), level2[250:257, 170:175])


def test_pyramid_tiff_serves_its_own_levels(catalog, records):
    record = records["edge/pyramid.ome.tif"]
    assert record.levels == ((512, 512), (256, 256), (128, 128)) and record.shape == (512, 512, 2)
    base = np.stack([NUCLEI, MASK], -1)
    with tifffile.TiffFile(record.path) as tif:
        assert len(tif.series[0].levels) == 3
    for level, step in ((0, 1), (1, 2), (2, 4)):
        np.testing.assert_array_equal(read(catalog, records, "edge/pyramid.ome.tif", level=level), base[::step, ::step])
    out = read(catalog, records, "edge/pyramid.ome.tif", level=1, region={"x": 200, "y": 10, "width": 56, "height": 30})
    np.testing.assert_array_equal(out, base[::2, ::2][10:40, 200:256])


@pytest.mark.parametrize("level", [-1, 1, 7])
def test_level_out_of_range_is_invalid_input(catalog, records, level):
    with pytest.raises(InvalidInputError, match=f"level {level} does not exist.*levels 0 to 0"):
        read(catalog, records, "he_histo.jpg", level=level)


@pytest.mark.parametrize("level", [True, 1.0, "1", None])
def test_level_must_be_an_integer(catalog, records, level):
    with pytest.raises(InvalidInputError, match="level must be an integer"):
        read(catalog, records, "edge/tall_1025x700.tif", level=level)


def test_block_mean_rounds_integers_and_keeps_input():
    image = np.array([[1, 2, 9], [2, 2, 9], [7, 7, 7]], dtype=np.uint8)[..., None]
    before = image.copy()
    out = block_mean(image, factor=2)
    np.testing.assert_array_equal(out[..., 0], [[2, 9], [7, 7]])  # 1.75 -> 2; partial blocks average what they have
    np.testing.assert_array_equal(image, before)
    np.testing.assert_array_equal(block_mean(np.ones((3, 3, 1), bool), factor=2)[..., 0], np.ones((2, 2), bool))


# ----------------------------------------------------------------------------- decoded PNG/JPEG pixels kept


def count_opens(monkeypatch, gate=None) -> list:
    """Count (and, with a ``gate`` Event, hold) the PNG/JPEG decodes of the images module."""
    import colabel.apps.provider.images as images

    opened: list = []
    real_open = images._open_pil

    def counting_open(path):
        opened.append(Path(path).name)
        if gate is not None:
            assert gate.wait(30), "decode held too long"
        return real_open(path)

    monkeypatch.setattr(images, "_open_pil", counting_open)
    return opened


def gradient(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[:height, :width]
    return np.stack([(x * 7 + y) % 251, (y * 3) % 256, (x ^ y) % 256], -1).astype(np.uint8)


def test_tiles_and_levels_of_a_large_png_decode_it_once(tmp_path, monkeypatch):
    """Each 1x1 tile of a large PNG decoded the whole image; now its pixels and its whole levels are kept."""
    pixels = gradient(1501, 1301)
    iio.imwrite(tmp_path / "big.png", pixels)
    catalog = ImageCatalog(tmp_path)
    image_id = image_id_for("big.png")
    assert catalog.get(image_id).levels == ((1501, 1301), (751, 651), (376, 326))
    opened = count_opens(monkeypatch)
    for i in range(6):
        tile = catalog.read(image_id, region={"x": 200 * i, "y": 100 * i, "width": 1, "height": 1})
        np.testing.assert_array_equal(tile, pixels[100 * i : 100 * i + 1, 200 * i : 200 * i + 1])
    corner = {"x": 649, "y": 749, "width": 2, "height": 2}  # with the partial blocks of the edges
    np.testing.assert_array_equal(catalog.read(image_id, level=1, region=corner),
                                  reference_block_mean(pixels, 2)[749:751, 649:651])
    for level, factor in ((1, 2), (2, 4)):
        whole = catalog.read(image_id, level=level)
        np.testing.assert_array_equal(whole, reference_block_mean(pixels, factor))
        for region in ({"x": 11, "y": 7, "width": 40, "height": 30}, {"x": 320, "y": 370, "width": 6, "height": 6}):
            x, y, w, h = region["x"], region["y"], region["width"], region["height"]
            out = catalog.read(image_id, level=level, region=region)
            np.testing.assert_array_equal(out, whole[y : y + h, x : x + w])
    assert opened == ["big.png"] and catalog.pixels.decodes == 1
    out = catalog.read(image_id, region={"x": 0, "y": 0, "width": 2, "height": 2})
    out[:] = 0  # what a read returns is the caller's own
    np.testing.assert_array_equal(catalog.read(image_id, region={"x": 0, "y": 0, "width": 2, "height": 2}),
                                  pixels[:2, :2])


def test_kept_pixels_hold_to_their_byte_budget_and_a_rewritten_file_is_decoded_again(tmp_path, monkeypatch):
    a, b = gradient(300, 400), gradient(400, 300)[::-1].copy()
    iio.imwrite(tmp_path / "a.png", a)
    iio.imwrite(tmp_path / "b.png", b)
    catalog = ImageCatalog(tmp_path, pixel_cache_bytes=a.nbytes + 1000)  # room for one of them
    opened = count_opens(monkeypatch)
    one = {"x": 5, "y": 5, "width": 1, "height": 1}
    for name in ("a.png", "a.png", "b.png", "b.png", "a.png"):
        catalog.read(image_id_for(name), region=one)
        assert catalog.pixels.nbytes <= catalog.pixels.max_bytes
    assert opened == ["a.png", "b.png", "a.png"]

    catalog.pixels.resize(0)  # nothing kept: every read decodes
    assert catalog.pixels.nbytes == 0
    catalog.read(image_id_for("a.png"), region=one)
    catalog.read(image_id_for("a.png"), region=one)
    assert opened[3:] == ["a.png", "a.png"]

    catalog.pixels.resize(10 * a.nbytes)
    catalog.read(image_id_for("a.png"), region=one)
    changed = a.copy()
    changed[5, 5] = (1, 2, 3)
    iio.imwrite(tmp_path / "a.png", changed)
    os.utime(tmp_path / "a.png", ns=(1, 1))  # another revision, whatever the clock's resolution
    np.testing.assert_array_equal(catalog.read(image_id_for("a.png"), region=one)[0, 0], [1, 2, 3])
    assert opened[5:] == ["a.png", "a.png"]
    assert catalog.pixels.nbytes == a.nbytes  # the former revision is no longer kept


def test_reads_of_one_png_at_the_same_time_wait_for_one_decode(tmp_path, monkeypatch):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import colabel.apps.provider.images as images

    pixels = gradient(800, 900)
    iio.imwrite(tmp_path / "big.png", pixels)
    (tmp_path / "broken.png").write_bytes((tmp_path / "big.png").read_bytes()[:5000])
    catalog = ImageCatalog(tmp_path)
    gate = threading.Event()
    opened = count_opens(monkeypatch, gate)
    waiting: list = []

    class CountedFuture(images.Future):  # counts the reads that wait for a decode another read started
        def result(self, timeout=None):
            waiting.append(1)
            return super().result(timeout)

    monkeypatch.setattr(images, "Future", CountedFuture)
    with ThreadPoolExecutor(9) as pool:
        reads = [pool.submit(catalog.read, image_id_for("big.png"), region={"x": i, "y": i, "width": 1, "height": 1})
                 for i in range(6)]
        broken = [pool.submit(catalog.read, image_id_for("broken.png")) for _ in range(3)]
        for _ in range(3000):  # one decode of each file started; the other 7 reads wait for them
            if len(opened) >= 2 and len(waiting) >= 7:
                break
            threading.Event().wait(0.01)
        assert len(opened) == 2 and len(waiting) == 7
        gate.set()
        for i, done in enumerate(reads):
            np.testing.assert_array_equal(done.result(timeout=60), pixels[i : i + 1, i : i + 1])
        for done in broken:  # a failed decode fails every read that waited for it, with the same sentence
            with pytest.raises(UnreadableImageError, match="image 'broken.png' cannot be decoded"):
                done.result(timeout=60)
    assert sorted(opened) == ["big.png", "broken.png"]
    with pytest.raises(UnreadableImageError, match="cannot be decoded"):  # not kept: the next read tries again
        catalog.read(image_id_for("broken.png"))
    assert sorted(opened) == ["big.png", "broken.png", "broken.png"]


# ----------------------------------------------------------------------------- size limit


def test_max_bytes_rejects_large_results_before_reading_and_suggests_region_or_level(catalog, records, monkeypatch):
    import colabel.apps.provider.images as images

    def no_read(*args, **kwargs):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(images, "_read_tiff", no_read)
    with pytest.raises(PayloadTooLargeError) as info:
        read(catalog, records, "dsb2018_nuclei.tif", max_bytes=512 * 512 * 2 - 1)
    message = str(info.value)
    assert "524288 bytes" in message and "region" in message and "level" in message
    assert isinstance(info.value, InvalidInputError)


def test_max_bytes_allows_results_up_to_the_limit(catalog, records):
    out = read(catalog, records, "dsb2018_nuclei.tif", max_bytes=512 * 512 * 2)
    assert out.nbytes == 512 * 512 * 2
    region = {"x": 0, "y": 0, "width": 10, "height": 10}
    small = read(catalog, records, "dsb2018_nuclei.tif", region=region, max_bytes=200)
    assert small.nbytes == 200


# ----------------------------------------------------------------------------- broken files


@pytest.mark.parametrize("name", ["bad/garbage.png", "bad/header_only.tif", "bad/text.tif", "bad/truncated.tif"])
def test_corrupt_file_is_listed_with_an_error_sentence(records, name):
    record = records[name]
    assert record.error and record.error.startswith(f"'{name}'")
    assert record.shape is None and record.dtype is None and record.levels == ()
    assert record.info().status == "unreadable"


def test_truncated_tiff_error_says_truncated(records):
    assert "truncated" in records["bad/truncated.tif"].error


@pytest.mark.parametrize("name", ["bad/garbage.png", "bad/truncated.tif"])
def test_reading_a_listed_corrupt_file_raises_unreadable(catalog, records, name):
    with pytest.raises(UnreadableImageError, match=re.escape(name)):
        read(catalog, records, name)


@pytest.mark.parametrize("name", ["bad/truncated.png", "bad/truncated.jpg"])
def test_header_valid_truncated_file_is_listed_but_read_raises_unreadable_naming_it(catalog, records, name):
    record = records[name]
    assert record.error is None and record.shape is not None
    with pytest.raises(UnreadableImageError, match=re.escape(f"image '{name}' cannot be decoded")):
        read(catalog, records, name)


def test_tiff_truncated_after_the_scan_raises_unreadable_naming_it(tmp_path):
    for name, kwargs in (("plain.tif", {}), ("tiled.tif", {"tile": (128, 128), "compression": "zlib"})):
        tifffile.imwrite(tmp_path / name, NUCLEI, **kwargs)
    catalog = ImageCatalog(tmp_path)
    for record in catalog.records():
        assert record.error is None
        data = record.path.read_bytes()
        record.path.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(UnreadableImageError, match=re.escape(f"image '{record.name}'")):
            catalog.read(record.image_id)


def test_file_replaced_after_the_scan_is_reported_not_misread(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", NUCLEI)
    catalog = ImageCatalog(tmp_path)
    tifffile.imwrite(tmp_path / "a.tif", NUCLEI[:100])
    with pytest.raises(UnreadableImageError, match="changed since"):
        catalog.read(image_id_for("a.tif"))
    (tmp_path / "a.tif").unlink()
    with pytest.raises(UnreadableImageError, match="no longer exists"):
        catalog.read(image_id_for("a.tif"))


# ----------------------------------------------------------------------------- links


@pytest.mark.parametrize("name", ["links/outside.png", "links/outside.tif"])
def test_link_outside_the_folder_is_listed_with_an_error_and_never_opened(folder, monkeypatch, name):
    import PIL.Image

    opened: list[str] = []
    real_open, real_tiff = PIL.Image.open, tifffile.TiffFile

    def spy_open(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    class SpyTiff(real_tiff):
        def __init__(self, arg, *args, **kwargs):
            opened.append(str(arg))
            super().__init__(arg, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", spy_open)
    monkeypatch.setattr(tifffile, "TiffFile", SpyTiff)
    catalog = ImageCatalog(folder)
    record = by_name(catalog)[name]
    assert record.error == f"'{name}' points outside the mounted folder"
    assert record.shape is None and record.info().status == "unreadable"
    with pytest.raises(UnreadableImageError, match="points outside the mounted folder"):
        catalog.read(record.image_id)
    assert opened and not any("secret" in p for p in opened)


def test_link_inside_the_folder_is_read_like_its_target(catalog, records):
    record = records["links/inside.tif"]
    assert record.error is None and record.image_id != records["dsb2018_nuclei.tif"].image_id
    np.testing.assert_array_equal(read(catalog, records, "links/inside.tif")[..., 0], NUCLEI)


def test_dangling_link_is_listed_as_broken(records):
    assert records["links/dangling.tif"].error == "'links/dangling.tif' is a broken link"


def test_link_swapped_to_outside_after_the_scan_is_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    tifffile.imwrite(root / "target.tif", NUCLEI)
    tifffile.imwrite(outside / "secret.tif", MASK)
    os.symlink(root / "target.tif", root / "link.tif")
    catalog = ImageCatalog(root)
    (root / "target.tif").unlink()
    os.symlink(outside / "secret.tif", root / "target.tif")
    with pytest.raises(UnreadableImageError, match="outside the mounted folder"):
        catalog.read(image_id_for("link.tif"))


def test_link_into_the_annotations_folder_is_listed_with_an_error_and_never_read(tmp_path):
    tifffile.imwrite(tmp_path / "image.tif", NUCLEI)
    labels = tmp_path / "annotations" / "sessions" / "s-1"
    labels.mkdir(parents=True)
    tifffile.imwrite(labels / "v000001.tif", MASK)
    os.symlink(labels / "v000001.tif", tmp_path / "leak.tif")
    catalog = ImageCatalog(tmp_path)
    record = by_name(catalog)["leak.tif"]
    assert record.error == "'leak.tif' points into the annotations folder" and record.shape is None
    with pytest.raises(UnreadableImageError, match="points into the annotations folder"):
        catalog.read(record.image_id)
    # an image listed while it was fine, swapped for a link to labels afterwards, is refused at reading
    (tmp_path / "image.tif").unlink()
    os.symlink(labels / "v000001.tif", tmp_path / "image.tif")
    with pytest.raises(UnreadableImageError, match="now points into the annotations folder"):
        catalog.read(image_id_for("image.tif"))


def test_errors_name_a_corrupt_file_relative_to_a_folder_whose_path_holds_spaces(tmp_path):
    folder = tmp_path / "John Smith" / "lab data"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"not a png at all")
    record = by_name(ImageCatalog(folder))["broken.png"]
    assert record.error.startswith("'broken.png' cannot be read")
    assert "John Smith" not in record.error and "lab data" not in record.error


# ----------------------------------------------------------------------------- no writes


def test_scanning_and_reading_never_change_the_folder(folder):
    before = tree_digest(folder)
    listing = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    catalog = ImageCatalog(folder)
    for record in catalog.records():
        for level in range(len(record.levels)):
            try:
                out = catalog.read(record.image_id, level=level)
            except UnreadableImageError:
                continue
            out[...] = 0  # the result is a copy: writing to it cannot reach the file
    catalog.refresh()
    assert tree_digest(folder) == before
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == listing


def test_every_readable_record_reads_as_listed(catalog):
    for record in catalog.records():
        if record.error or record.name.startswith("bad/"):
            continue
        for level, (height, width) in enumerate(record.levels):
            out = catalog.read(record.image_id, level=level)
            assert out.shape == (height, width, record.shape[2]) and out.dtype.name == record.dtype
