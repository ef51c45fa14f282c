"""`colabel train` on a pulled set, and its outlines offered as pre-annotations."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile

from conftest import DATA, collection, make_image_folder, square

pytestmark = pytest.mark.e2e

COLABEL = [sys.executable, "-m", "colabel.apps.cli"]


def test_train_on_a_pulled_set_then_preannotate_an_unsaved_image(tmp_path):
    from colabel.apps.provider.annotations import validate_feature_collection
    from colabel.apps.provider.preannotate import PreAnnotator
    from colabel.apps.provider.provider import DataProvider
    from colabel.services.nuclei import measure_nuclei

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="train", classes=[{"name": "nucleus", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    dsb = next(r.image_id for r in provider.catalog.records() if r.name == "dsb2018_nuclei.tif")
    _, nuclei = measure_nuclei(tifffile.imread(DATA / "dsb2018_nuclei_mask.tif"))
    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": n.polygon, "properties": {"classification": {"name": "nucleus"}}}
        for n in nuclei]}
    provider.save_annotation(info, dsb, annotator.annotator_id, fc)

    pulled, model = tmp_path / "pulled", tmp_path / "unet.pt"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    package = tmp_path / "package"
    trained = subprocess.run([*COLABEL, "train", str(pulled), "--out", str(model), "--epochs", "3",
                              "--bioimageio", str(package)], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert model.is_file() and "training on 1 images" in trained.stdout
    record = json.loads((tmp_path / "unet.pt.json").read_text())
    assert record["config"]["out_channels"] == 3 and record["config"]["tta"] is True  # centre map, test-time flips
    # the exported package (validated with bioimageio.spec during export when it is installed) names the 3 maps
    description = (package / "bioimageio.yaml").read_text()
    assert "centre" in description and "boundary" in description

    preannotator = PreAnnotator(provider, model)
    ihc = next(r.image_id for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    proposal = asyncio.run(preannotator.pre_annotation(info, ihc))
    assert proposal["type"] == "FeatureCollection" and proposal["model"] == "unet.pt"
    validate_feature_collection(proposal, image_shape=(512, 512))  # valid, editable polygons in image pixels
    assert all(f["properties"]["colabel_source"] == "preannotation" for f in proposal["features"])
    assert not list((folder / "annotations").rglob(f"images/{ihc}/*/*.geojson"))  # nothing stored
    with pytest.raises(Exception, match="unknown image id"):
        asyncio.run(preannotator.pre_annotation(info, "img-0000000000000000"))
    # each image predicted once while it stays among the last max_cached (max_cached=1: the next test)
    assert asyncio.run(preannotator.pre_annotation(info, ihc)) == proposal and preannotator.predictions == 1



def test_train_holds_out_images_and_reports_the_objects_to_fix_on_them(tmp_path):
    from colabel.apps.provider.preannotate import PreAnnotator
    from colabel.apps.provider.provider import DataProvider
    from colabel.services.nuclei import measure_nuclei, segment_nuclei

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="rgb", classes=[{"name": "nucleus", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    objects = {}
    for record in provider.catalog.records():
        if record.name in ("ihc_ki67.png", "sub/he_histo.jpg"):  # the two RGB images, labelled classically
            _, nuclei = measure_nuclei(segment_nuclei(provider.get_image(record.image_id, session=info)).labels)
            objects[record.image_id] = len(nuclei)
            provider.save_annotation(info, record.image_id, annotator.annotator_id, {
                "type": "FeatureCollection", "features": [
                    {"type": "Feature", "geometry": n.polygon, "properties": {"classification": {"name": "nucleus"}}}
                    for n in nuclei]})
    assert len(objects) == 2
    pulled, model = tmp_path / "pulled", tmp_path / "unet.pt"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    refused = subprocess.run([*COLABEL, "train", str(pulled), "--out", str(model), "--hold-out", "2"],
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--hold-out must be between 0 and 1" in refused.stderr
    assert not model.exists()
    trained = subprocess.run([*COLABEL, "train", str(pulled), "--out", str(model), "--epochs", "2", "--crop", "64",
                              "--hold-out", "1", "--no-flips"], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "training on 1 images" in trained.stdout and "held out 1 images" in trained.stdout
    record = json.loads((tmp_path / "unet.pt.json").read_text())
    validation = record["metrics"]["validation"]
    assert record["metrics"]["n_images"] == 1 and len(validation["image_ids"]) == 1
    held = validation["image_ids"][0]
    assert validation["tp"] + validation["fn"] == objects[held]  # every annotated object of the held-out image
    assert validation["sources"] == [[held, annotator.annotator_id, 1]]  # whose annotation it was scored against
    assert record["metrics"]["sources"] == [[i, annotator.annotator_id, 1] for i in objects if i != held]
    assert f"objects to fix {validation['objects_to_fix']:.1%}" in trained.stdout

    # pre-annotations keep the last max_cached images' proposals (this model predicts without flips: quicker)
    small = PreAnnotator(provider, model, max_cached=1)
    ihc, dsb = (next(r.image_id for r in provider.catalog.records() if r.name == name)
                for name in ("ihc_ki67.png", "dsb2018_nuclei.tif"))
    for image_id in (ihc, dsb, ihc):
        asyncio.run(small.pre_annotation(info, image_id))
    assert small.predictions == 3  # dsb pushed ihc out
    asyncio.run(small.pre_annotation(info, ihc))
    assert small.predictions == 3

    # the next round fine-tunes this model (--init) and says so in its record
    tuned = tmp_path / "unet2.pt"
    for extra, message in ((["--init", str(tmp_path / "nope.pt")], "--init model"),
                           (["--init", str(model), "--maps", "2"], "has maps 3, not 2")):
        refused = subprocess.run([*COLABEL, "train", str(pulled), "--out", str(tuned), *extra], capture_output=True,
                                 text=True, timeout=120)
        assert refused.returncode == 2 and message in refused.stderr and not tuned.exists()
    again = subprocess.run([*COLABEL, "train", str(pulled), "--out", str(tuned), "--epochs", "1", "--crop", "64",
                            "--init", str(model)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "fine-tuning" in again.stdout, again.stdout + again.stderr
    init = json.loads((tmp_path / "unet2.pt.json").read_text())["config"]["init"]
    assert init["file"] == "unet.pt" and init["training_set_version"] == record["training_set_version"]

def _ihc_pulled_set(tmp_path, classes_named):
    """A real pulled set: the IHC image's classical nuclei, each classed by its mean DAB optical density
    (rgb2hed channel 2) against Otsu's threshold, saved by an annotator and pulled from the folder."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    from colabel.apps.provider.provider import DataProvider
    from colabel.services.nuclei import measure_nuclei, segment_nuclei

    folder = make_image_folder(tmp_path / "images")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="ki67", classes=[{"name": "negative", "color": "#0000ff"},
                                                            {"name": "positive", "color": "#ff0000"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    ihc = next(r for r in provider.catalog.records() if r.name == "ihc_ki67.png")
    image = provider.get_image(ihc.image_id, session=info)
    labels, nuclei = measure_nuclei(segment_nuclei(image).labels)
    dab = rgb2hed(image[..., :3])[..., 2]
    means = np.asarray([dab[labels == k].mean() for k in range(1, len(nuclei) + 1)])
    truth = np.where(means > threshold_otsu(means), "positive", "negative")
    features = [{"type": "Feature", "geometry": n.polygon,
                 "properties": {"classification": {"name": classes_named(str(c))}}}
                for n, c in zip(nuclei, truth, strict=True)]
    provider.save_annotation(info, ihc.image_id, annotator.annotator_id,
                             {"type": "FeatureCollection", "features": features})
    pulled = tmp_path / "pulled"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return pulled, truth


def test_train_classifier_on_pulled_cell_classes_and_serve_it_from_the_hals_store(tmp_path):
    from colabel.services.hals.service import ClassifierService
    from colabel.services.training.classifier_training import TrainedClassifier, cell_features, read_pulled_cells

    pulled, truth = _ihc_pulled_set(tmp_path, lambda c: c)
    out, store = tmp_path / "models" / "ki67.npz", tmp_path / "hals-cache"
    done = subprocess.run([*COLABEL, "train-classifier", str(pulled), "--out", str(out), "--install", str(store)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "features (EfficientNet-Lite0)" in done.stderr  # progress bar
    record = json.loads((tmp_path / "models" / "ki67.npz.json").read_text())
    counts = {c: int((truth == c).sum()) for c in ("negative", "positive")}
    assert record["classes"] == ["negative", "positive"]
    assert record["metrics"]["class_counts"] == counts and record["metrics"]["n_cells"] == len(truth)
    assert record["metrics"]["val_accuracy"] > 0.8  # DAB-positive vs negative is visible in the patches
    assert len(record["training_set_version"]) == 16

    model = TrainedClassifier.load(out)
    cells = read_pulled_cells(pulled)
    features, labels = cell_features(cells)
    names, confidence = model.predict(features)
    assert np.mean(np.asarray(names) == np.asarray(model.classes)[labels]) > 0.85
    assert ((confidence >= 0.5) & (confidence <= 1)).all()
    # the HALS classifier service answers with the installed model
    model_id = done.stdout.split("model_id ")[-1].strip()
    served = ClassifierService(cache_dir=str(store)).predict(model_id, features)
    assert [model.classes[c] for c in served["classes"]] == names

    again = subprocess.run([*COLABEL, "train-classifier", str(pulled), "--out", str(out)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr


def test_train_classifier_refuses_a_class_without_cells_and_writes_nothing(tmp_path):
    pulled, _ = _ihc_pulled_set(tmp_path, lambda c: "negative")  # every cell labelled "negative"
    out = tmp_path / "head.npz"
    done = subprocess.run([*COLABEL, "train-classifier", str(pulled), "--out", str(out), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "'positive' has 0" in done.stderr and "at least 2" in done.stderr
    assert not out.exists() and not (tmp_path / "head.npz.json").exists()
    not_pulled = subprocess.run([*COLABEL, "train-classifier", str(tmp_path), "--out", str(out)],
                                capture_output=True, text=True, timeout=60)
    assert not_pulled.returncode == 2 and "not a pulled set" in not_pulled.stderr


def test_train_refuses_a_folder_that_is_not_a_pulled_set_and_writes_nothing(tmp_path):
    out = tmp_path / "unet.pt"
    done = subprocess.run([*COLABEL, "train", str(tmp_path), "--out", str(out)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "is not a pulled set (no labels.zarr)" in done.stderr
    assert not out.exists()


def test_training_images_drop_a_single_channel_axis_and_an_opaque_alpha_only():
    import numpy as np

    from colabel.apps.train import training_image

    grey = np.zeros((4, 5, 1), np.uint16)
    assert training_image(grey).shape == (4, 5)
    rgba = np.full((4, 5, 4), 255, np.uint8)
    assert training_image(rgba).shape == (4, 5, 3)  # opaque alpha carries nothing
    rgba[0, 0, 3] = 0
    assert training_image(rgba).shape == (4, 5, 4)  # a real alpha (or a 4th channel) is kept
    assert training_image(np.zeros((4, 5, 3), np.uint8)).shape == (4, 5, 3)


@pytest.fixture(scope="module")
def small_first(tmp_path_factory):
    """A pulled set whose first image (by id) is small and grey, the second large and RGB: ``tiny.tif``, 48 x 40
    pixels of the 16-bit DSB2018 image with its hand-drawn nuclei (Ada, saved twice), and the 512 x 512 IHC image
    with six squares by Ada and by Bob (so it has a consensus)."""
    from colabel.apps.provider.images import image_id_for
    from colabel.apps.provider.provider import DataProvider
    from colabel.services.nuclei import measure_nuclei

    root = tmp_path_factory.mktemp("small_first")
    folder = root / "images"
    folder.mkdir()
    tifffile.imwrite(folder / "tiny.tif", tifffile.imread(DATA / "dsb2018_nuclei.tif")[:48, :40])
    (folder / "ihc_ki67.png").write_bytes((DATA / "ihc_ki67.png").read_bytes())
    tiny, ihc = image_id_for("tiny.tif"), image_id_for("ihc_ki67.png")
    assert tiny < ihc  # the small image is images[0]
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="mixed", classes=[{"name": "nucleus", "color": "#ff0000"}])
    ada, _ = provider.sessions.join(info.session_id, "Ada")
    bob, _ = provider.sessions.join(info.session_id, "Bob")
    _, nuclei = measure_nuclei(tifffile.imread(DATA / "dsb2018_nuclei_mask.tif")[:48, :40])
    drawn = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": n.polygon, "properties": {"classification": {"name": "nucleus"}}}
        for n in nuclei]}
    provider.save_annotation(info, tiny, ada.annotator_id, {**drawn, "features": drawn["features"][:1]})
    versions = {"tiny": provider.save_annotation(info, tiny, ada.annotator_id, drawn).version}
    squares = collection(*(square(40 + 70 * k, 60 + 50 * (k % 2), 24) for k in range(6)))
    for who in (ada, bob):
        versions[who.display_name] = provider.save_annotation(info, ihc, who.annotator_id, squares).version
    pulled = root / "pulled"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {"pulled": pulled, "tiny": tiny, "ihc": ihc, "ada": ada.annotator_id, "bob": bob.annotator_id,
            "versions": versions, "root": root}


def test_train_converts_grey_to_rgb_records_sources_and_exports_the_largest_image(small_first):
    """The reviewer's set: grey and RGB mixed (refused before: "same number of channels"), and a 48 x 40 first image
    (the export's test input was images[0]: "test_image must be at least 64 x 64 pixels", exit 2, after training)."""
    s = small_first
    model, package = s["root"] / "unet.pt", s["root"] / "package"
    trained = subprocess.run([*COLABEL, "train", str(s["pulled"]), "--out", str(model), "--epochs", "1", "--crop",
                              "64", "--no-flips", "--bioimageio", str(package), "--name", "colabel mixed set"],
                             capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert "converted 1 of 2 images to the model's 3 channel(s) (grey repeated to RGB)" in trained.stdout
    record = json.loads((s["root"] / "unet.pt.json").read_text())
    assert record["config"]["in_channels"] == 3
    metrics = record["metrics"]
    assert metrics["sources"] == [[s["tiny"], s["ada"], s["versions"]["tiny"]], [s["ihc"], "consensus", 0]]
    assert s["versions"]["tiny"] == 2  # the latest version pulled, not the first
    assert metrics["consensus_of"] == {s["ihc"]: {s["ada"]: s["versions"]["Ada"], s["bob"]: s["versions"]["Bob"]}}
    assert metrics["image_names"] == {s["tiny"]: "tiny.tif", s["ihc"]: "ihc_ki67.png"}
    assert metrics["converted_channels"] == {s["tiny"]: [1, 3]}
    # the test input is the IHC image, cropped to 256 px, with the model's 3 channels
    assert np.load(package / "test_input.npy").shape == (1, 3, 256, 256)
    assert f"(test input: {s['ihc']})" in trained.stdout


@pytest.mark.parametrize(("extra", "message"), [
    (["--name", "rgb"], "--name 'rgb' is not a bioimage.io model name"),
    (["--name", "colabel/unet"], "is not a bioimage.io model name"),
    (["--author", "a/b"], "is not a bioimage.io author name"),
    (["--hold-out", "1", "--seed", "SEED"], "64 x 64 pixels for the package's test input; the largest is 48 x 40"),
    (["--annotator", "BOB", "--hold-out", "1"], "--hold-out needs at least 2 labelled images (the set has 1), got 1"),
])
def test_train_refuses_export_settings_that_would_fail_before_training_and_writes_nothing(small_first, tmp_path,
                                                                                          extra, message):
    s = small_first
    if "SEED" in extra:  # a seed that holds the IHC image out: only the 48 x 40 image is trained on
        seed = next(k for k in range(100) if np.random.default_rng(k).permutation(2)[0] == 1)
        extra = [str(seed) if e == "SEED" else e for e in extra]
    extra = [s["bob"] if e == "BOB" else e for e in extra]  # Bob labelled one image only
    model, package = tmp_path / "unet.pt", tmp_path / "package"
    done = subprocess.run([*COLABEL, "train", str(s["pulled"]), "--out", str(model), "--epochs", "1", "--crop", "64",
                           "--bioimageio", str(package), *extra], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
    assert "training on" not in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_a_package_folder_in_use_a_folder_or_an_existing_model_before_training(small_first, tmp_path):
    s = small_first
    (tmp_path / "package").mkdir()
    (tmp_path / "package" / "keep.txt").write_text("mine")
    (tmp_path / "round1.pt").write_bytes(b"a model of the last round")
    for out, package, message in ((tmp_path / "unet.pt", tmp_path / "package", "exists and is not an empty folder"),
                                  (tmp_path / "package", tmp_path / "new", "is a folder; give the model file"),
                                  (tmp_path / "round1.pt", tmp_path / "new", "exists; pass --overwrite to replace it")):
        done = subprocess.run([*COLABEL, "train", str(s["pulled"]), "--out", str(out), "--bioimageio", str(package)],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr, done.stdout + done.stderr
        assert "training on" not in done.stdout
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["keep.txt", "package", "round1.pt"]
    assert (tmp_path / "round1.pt").read_bytes() == b"a model of the last round"


def test_training_sources_follow_the_annotator_asked_for(small_first):
    from colabel.apps.train import training_sources

    s = small_first
    assert training_sources(s["pulled"], [s["ihc"]], s["bob"]) == {
        "sources": [[s["ihc"], s["bob"], s["versions"]["Bob"]]], "image_names": {s["ihc"]: "ihc_ki67.png"}}
    assert training_sources(s["pulled"], [s["tiny"]], None)["sources"] == [[s["tiny"], s["ada"], s["versions"]["tiny"]]]


def test_train_classifier_skips_and_counts_a_cell_covered_by_a_later_outline(tmp_path):
    """The reviewer's set: a classified outline drawn wholly under a later one keeps its cells.csv row but has no pixel;
    train-classifier failed on the whole set ("nucleus ids not in labels: [1]", naming neither image nor annotator)."""
    from colabel.apps.provider.provider import DataProvider
    from colabel.services.training.classifier_training import read_pulled_cells

    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(DATA / "ihc_ki67.png", folder / "ihc_ki67.png")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="covered", classes=[{"name": "nucleus", "color": "#ff0000"},
                                                               {"name": "other", "color": "#0000ff"}])
    annotator, _ = provider.sessions.join(info.session_id, "Ada")
    (ihc,) = [r.image_id for r in provider.catalog.records()]
    provider.save_annotation(info, ihc, annotator.annotator_id, collection(
        square(100, 100, 8, "nucleus"), square(96, 96, 20, "other"),  # label 1 lies wholly under label 2
        *(square(40 + 60 * k, 300, 14, "nucleus" if k % 2 else "other") for k in range(6))))
    pulled = tmp_path / "pulled"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    cells = read_pulled_cells(pulled)
    assert cells.skipped_without_pixels == 1 and cells.skipped_unclassified == 0
    assert cells.ids[ihc].tolist() == list(range(2, 9))  # every cell but the covered one
    assert cells.class_counts() == {"nucleus": 3, "other": 4}

    out = tmp_path / "head.npz"
    trained = subprocess.run([*COLABEL, "train-classifier", str(pulled), "--out", str(out), "--members", "2",
                              "--quiet"], capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert ("7 classified cells in 1 images (nucleus 3, other 4); 0 without a class skipped, 1 without pixels "
            "(covered by later outlines) skipped") in trained.stdout
    record = json.loads((tmp_path / "head.npz.json").read_text())
    assert record["metrics"]["n_cells"] == 7


@pytest.fixture(scope="module")
def odd_channels(tmp_path_factory):
    """A pulled set of channel counts a model cannot mix: Ada labelled the RGB IHC image and ``two.tif`` (a 128 x 128
    crop of the 16-bit DSB2018 image stored with 2 channels), Bob ``five.tif`` (the same crop with 5 channels)."""
    from colabel.apps.provider.provider import DataProvider

    root = tmp_path_factory.mktemp("odd_channels")
    folder = root / "images"
    folder.mkdir()
    dsb = tifffile.imread(DATA / "dsb2018_nuclei.tif")[:128, :128]
    tifffile.imwrite(folder / "two.tif", np.stack([dsb] * 2), photometric="minisblack")
    tifffile.imwrite(folder / "five.tif", np.stack([dsb] * 5), photometric="minisblack")
    shutil.copy(DATA / "ihc_ki67.png", folder / "ihc_ki67.png")
    provider = DataProvider(folder)
    info, _ = provider.create_session(name="odd", classes=[{"name": "nucleus", "color": "#ff0000"}])
    ada, _ = provider.sessions.join(info.session_id, "Ada")
    bob, _ = provider.sessions.join(info.session_id, "Bob")
    ids = {r.name: r.image_id for r in provider.catalog.records()}
    assert {r.name: r.shape[-1] for r in provider.catalog.records()} == {"two.tif": 2, "five.tif": 5, "ihc_ki67.png": 3}
    squares = collection(square(10, 10, 20), square(50, 50, 25), square(80, 20, 18))
    for name, who in (("ihc_ki67.png", ada), ("two.tif", ada), ("five.tif", bob)):
        provider.save_annotation(info, ids[name], who.annotator_id, squares)
    pulled = root / "pulled"
    done = subprocess.run([*COLABEL, "pull", str(folder), "--session", info.session_id, "--out", str(pulled)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {"pulled": pulled, "ids": ids, "ada": ada.annotator_id, "bob": bob.annotator_id}


def test_train_refuses_a_held_out_image_of_channels_it_cannot_take_before_training_naming_it(odd_channels, tmp_path):
    """--hold-out: the held-out 2-channel image next to an RGB one was found only after training, by an unnamed
    "an image of shape (128, 128, 2) cannot be given 3 channel(s)"."""
    s = odd_channels
    two = f"image two.tif ({s['ids']['two.tif']})"
    position = sorted([s["ids"]["ihc_ki67.png"], s["ids"]["two.tif"]]).index(s["ids"]["two.tif"])
    seed = next(k for k in range(100) if np.random.default_rng(k).permutation(2)[0] == position)  # holds two.tif out
    model = tmp_path / "unet.pt"
    for extra in (["--hold-out", "1", "--seed", str(seed)], []):
        done = subprocess.run([*COLABEL, "train", str(s["pulled"]), "--out", str(model), "--annotator", s["ada"],
                               "--epochs", "1", "--crop", "32", "--encoder", "none", *extra],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "training on" not in done.stdout
        assert f"cannot train one model on images of [2, 3] channels ({two} has 2)" in done.stderr, done.stderr
    assert list(tmp_path.iterdir()) == []


def test_train_refuses_an_image_of_more_than_4_channels_by_name_as_its_help_says(odd_channels, tmp_path):
    s = odd_channels
    for encoder in ("none", "efficientnet-lite0"):
        done = subprocess.run([*COLABEL, "train", str(s["pulled"]), "--out", str(tmp_path / "unet.pt"), "--annotator",
                               s["bob"], "--epochs", "1", "--crop", "32", "--encoder", encoder],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "training on" not in done.stdout, done.stdout + done.stderr
        assert (f"colabel: image five.tif ({s['ids']['five.tif']}): image must have 1 to 4 channels last, got shape "
                "(128, 128, 5)") in done.stderr
    assert list(tmp_path.iterdir()) == []
    helped = subprocess.run([*COLABEL, "train", "--help"], capture_output=True, text=True, timeout=60)
    text = " ".join(helped.stdout.split())
    assert "none: a small plain U-Net from random weights, images of 1 to 4 channels" in text
    assert "any channel count" not in text


def test_out_under_a_file_is_refused_before_any_work_and_nothing_is_written(small_first, tmp_path):
    """`colabel train --out afile/unet.pt` trained in full, then failed with a FileExistsError traceback."""
    s = small_first
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    fast = ["--epochs", "1", "--crop", "64", "--no-flips"]
    for command, message in (
            (["train", str(s["pulled"]), "--out", str(afile / "unet.pt"), *fast],
             f"--out {afile / 'unet.pt'}: {afile} is not a folder"),
            (["train", str(s["pulled"]), "--out", str(afile / "deeper" / "unet.pt"), *fast],
             f"--out {afile / 'deeper' / 'unet.pt'}: {afile} is not a folder"),
            (["train", str(s["pulled"]), "--out", str(tmp_path / "unet.pt"), "--bioimageio", str(afile / "pkg"), *fast],
             f"--bioimageio {afile / 'pkg'}: {afile} is not a folder"),
            (["train-classifier", str(s["pulled"]), "--out", str(afile / "head.npz"), "--quiet"],
             f"--out {afile / 'head.npz'}: {afile} is not a folder")):
        done = subprocess.run([*COLABEL, *command], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2 and done.stderr.strip() == f"colabel: {message}", done.stdout + done.stderr
        assert "training on" not in done.stdout and "classified cells" not in done.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["afile"] and afile.read_text() == "not a folder"
