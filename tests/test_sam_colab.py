"""BioImage.IO Colab-compatible functions on the tiny SAM: embedding format, ONNX decoder, automatic masks."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from sam_fixtures import (
    TINY_ID,
    tiny_checkpoint_fixture,  # noqa: F401
    tiny_checkpoints_fixture,  # noqa: F401
    tiny_sam_fixture,  # noqa: F401
    torch_one_thread_fixture,  # noqa: F401
)

from colabel.errors import InvalidInputError, NotFoundError
from colabel.services.sam.colab import ColabSam, ModelPool
from colabel.services.sam.transforms import points_from_model, points_to_model

pytestmark = pytest.mark.unit

IMAGE = np.random.default_rng(7).integers(0, 4000, (180, 120), dtype=np.uint16)  # tall, 16-bit


@pytest.fixture
def colab(tiny_checkpoints, tmp_path):
    pool = ModelPool(checkpoints=tiny_checkpoints, embedding_dir=tmp_path / "emb", device="cpu", max_models=1)
    return ColabSam(pool)


def onnx_inputs(out: dict, points_xy: np.ndarray, labels: np.ndarray) -> dict:
    # Colab's client: coordinates * sam_scale, plus a padding point with label -1 when there is no box
    coords = np.concatenate([points_xy * out["sam_scale"], [[0.0, 0.0]]])[None].astype(np.float32)
    lab = np.concatenate([labels, [-1]])[None].astype(np.float32)
    return {
        "image_embeddings": out["features"],
        "point_coords": coords,
        "point_labels": lab,
        "mask_input": np.zeros((1, 1, 64, 64), np.float32),  # 4 x the tiny model's 16 x 16 grid
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.array(out["original_image_shape"], np.float32),
    }


def test_hello_ping_status(colab):
    assert "Interactive Segmentation" in colab.hello()
    assert colab.ping() == "pong"
    status = colab.deployment_status()
    assert status["status"] == "ready" and status["loaded"] == []
    assert TINY_ID in status["models"] and "sam_vit_b_lm" in status["models"]
    assert status["models"]["sam_vit_b_lm"]["checksum"].startswith("xxh128:")


def test_compute_embedding_format(colab):
    out = colab.compute_embedding(IMAGE, TINY_ID)
    assert set(out) == {"features", "original_image_shape", "sam_scale", "mask_threshold"}
    assert out["features"].shape == (1, 256, 16, 16) and out["features"].dtype == np.float32
    assert out["original_image_shape"] == [180, 120]
    assert out["sam_scale"] == pytest.approx(256 / 180)
    assert out["mask_threshold"] == 0.0
    assert colab.deployment_status()["loaded"] == [TINY_ID]
    with pytest.raises(NotFoundError, match="known models"):
        colab.compute_embedding(IMAGE, "sam_vit_z")


def test_onnx_decoder_runs_and_matches_torch(colab):
    out = colab.compute_embedding(IMAGE, TINY_ID)
    data = colab.get_onnx_model(TINY_ID, quantize=False)
    assert isinstance(data, bytes) and colab.get_onnx_model(TINY_ID, quantize=False) is data  # cached
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [
        "image_embeddings", "point_coords", "point_labels", "mask_input", "has_mask_input", "orig_im_size"]
    point = np.array([[60.5, 90.5]])
    masks, iou, low_res = session.run(None, onnx_inputs(out, point, np.array([1.0])))
    assert masks.shape == (1, 1, 180, 120) and iou.shape == (1, 1) and low_res.shape == (1, 1, 64, 64)
    # the same prompt through colabel's torch path. ONNX gets [x, y] * sam_scale, a single scalar, while
    # SAM's ResizeLongestSide scales each axis by its rounded size (x: 171 / 120 = 1.425, not 256 / 180):
    # Colab's client is off by up to half a model pixel there. Give the torch path the image point that
    # lands on the very same model coordinate, so both decode the identical prompt.
    segmenter = colab.models.get(TINY_ID)
    embedding = segmenter.embed(IMAGE, tiling=False)
    same = points_from_model(point * out["sam_scale"], (180, 120), 256)
    np.testing.assert_allclose(points_to_model(same, (180, 120), 256), point * out["sam_scale"])
    # SamOnnxModel with one click picks the best of the three multimask outputs, as multimask=True does
    mask, score, _ = segmenter.decode_tile(embedding, 0, points=same, labels=np.array([1]), multimask=True)
    assert score == pytest.approx(float(iou[0, 0]), abs=1e-3)
    assert (mask != (masks[0, 0] > out["mask_threshold"])).mean() < 0.01


def test_onnx_masks_are_cropped_for_any_image_shape(colab):
    """segment_anything's SamOnnxModel freezes the padding crop at the export-time dummy size (int() of a
    traced tensor), so a model exported with a square dummy stretches masks of non-square images over the
    padding; colabel's export keeps the crop dynamic: ONNX equals the eager torch module for every shape."""
    import torch
    from segment_anything.utils.onnx import SamOnnxModel

    out = colab.compute_embedding(IMAGE, TINY_ID)
    session = ort.InferenceSession(colab.get_onnx_model(TINY_ID, quantize=False), providers=["CPUExecutionProvider"])
    eager = SamOnnxModel(colab.models.get(TINY_ID).sam, return_single_mask=True)
    inputs = onnx_inputs(out, np.array([[40.0, 50.0]]), np.array([1.0]))
    for shape in [(180, 120), (100, 250), (256, 256), (600, 40)]:
        inputs["orig_im_size"] = np.array(shape, np.float32)
        masks, _, _ = session.run(None, inputs)
        with torch.no_grad():
            expected = eager(*[torch.from_numpy(v) for v in inputs.values()])[0].numpy()
        assert masks.shape == (1, 1, *shape)
        np.testing.assert_allclose(masks, expected, atol=1e-4)


def test_quantized_onnx_is_smaller_and_runs(colab):
    out = colab.compute_embedding(IMAGE, TINY_ID)
    full = colab.get_onnx_model(TINY_ID, quantize=False)
    small = colab.get_onnx_model(TINY_ID)
    assert len(small) < len(full) / 2
    session = ort.InferenceSession(small, providers=["CPUExecutionProvider"])
    masks, iou, _ = session.run(None, onnx_inputs(out, np.array([[10.0, 20.0], [100.0, 150.0]]), np.array([1.0, 0.0])))
    assert masks.shape == (1, 1, 180, 120) and np.all(np.isfinite(iou))
    with pytest.raises(InvalidInputError, match="quantize"):
        colab.get_onnx_model(TINY_ID, quantize="yes")


def test_segment_image_label_image(colab):
    out = colab.segment_image(IMAGE, TINY_ID, points_per_side=6, pred_iou_thresh=0.0,
                              stability_score_thresh=0.0, min_mask_region_area=0)
    assert set(out) == {"mask"}
    labels = out["mask"]
    assert labels.shape == (180, 120) and labels.dtype.kind == "u" and labels.dtype.itemsize >= 2
    rgb = np.repeat(IMAGE[..., None], 3, axis=2)
    assert colab.segment_image(rgb, TINY_ID, 4, 0.0, 0.0, 10)["mask"].shape == (180, 120)


def test_model_pool_is_lazy_and_bounded(tiny_checkpoints, tmp_path):
    pool = ModelPool(checkpoints={**tiny_checkpoints, "other": tiny_checkpoints[TINY_ID]},
                     embedding_dir=tmp_path, device="cpu", max_models=1)
    assert pool.loaded() == []
    first = pool.get(TINY_ID)
    assert pool.get(TINY_ID) is first
    pool.get("other")
    assert pool.loaded() == ["other"]
    with pytest.raises(NotFoundError):
        pool.get("nope")
    with pytest.raises(InvalidInputError):
        ModelPool(max_models=0)


@pytest.mark.parametrize("n_points", [1, 2, 3])
def test_service_picks_masks_as_the_browser_decoder_does(colab, tiny_checkpoints, tmp_path, n_points):
    """The annotator's click decoded in the browser (ONNX) and on the server (SamService) must give the same
    object: one click is ambiguous, so both take the best of SAM's three masks; more points take the single
    mask. The score the service returns is the ONNX decoder's IoU prediction for the same prompt."""
    from colabel.services.sam.service import SamService

    out = colab.compute_embedding(IMAGE, TINY_ID)
    session = ort.InferenceSession(colab.get_onnx_model(TINY_ID, quantize=False), providers=["CPUExecutionProvider"])
    model_points = np.array([[60.5, 90.5], [30.5, 40.5], [90.5, 150.5]])[:n_points]
    labels = np.array([1.0, 0.0, 1.0])[:n_points]
    _, iou, _ = session.run(None, onnx_inputs(out, model_points, labels))
    service = SamService(default_model=TINY_ID, checkpoints=tiny_checkpoints, embedding_dir=str(tmp_path / "s"),
                         tile_size=1024)
    embedded = service.embed(IMAGE)
    same = points_from_model(model_points * out["sam_scale"], (180, 120), 256)
    result = service.segment(embedded["embedding_id"], points=same.tolist(), labels=labels.astype(int).tolist())
    assert result["score"] == pytest.approx(float(iou[0, 0]), abs=1e-3)
    forced = service.segment(embedded["embedding_id"], points=same.tolist(), labels=labels.astype(int).tolist(),
                             multimask=n_points > 1)  # the other choice: a different mask's score
    assert forced["score"] != pytest.approx(float(iou[0, 0]), abs=1e-3)


def test_a_none_model_id_uses_the_services_default_model(tiny_checkpoints, tmp_path):
    from colabel.services.sam.service import SamService

    service = SamService(default_model=TINY_ID, checkpoints=tiny_checkpoints, embedding_dir=str(tmp_path / "s"))
    out = service.compute_embedding(IMAGE, None)
    np.testing.assert_array_equal(out["features"], service.compute_embedding(IMAGE, TINY_ID)["features"])
    assert service.segment_image(IMAGE[:64, :64], None, 2, 0.0, 0.0, 0)["mask"].shape == (64, 64)
    assert service.get_onnx_model(None, False) is service.get_onnx_model(TINY_ID, False)  # one export, one id
    colab = ColabSam(ModelPool(checkpoints=tiny_checkpoints, embedding_dir=tmp_path / "c", device="cpu"))
    with pytest.raises(InvalidInputError, match="model_id is required: this service has no default model"):
        colab.compute_embedding(IMAGE, None)


def test_the_embedding_memory_budget_is_configurable_on_the_service(tiny_checkpoints, tmp_path):
    from colabel.services.sam.embeddings import DEFAULT_MAX_BYTES
    from colabel.services.sam.service import SamService

    assert SamService(embedding_dir=str(tmp_path / "a")).models.store.max_bytes == DEFAULT_MAX_BYTES == 2 << 30
    service = SamService(default_model=TINY_ID, checkpoints=tiny_checkpoints, embedding_dir=str(tmp_path / "b"),
                         embedding_memory_bytes=1000)
    service.embed(IMAGE)  # 256 x 16 x 16 float32 features: 256 KiB, over the budget
    assert service.models.store.memory_bytes() == 0 and service.encoder_passes() == 1
    service.embed(IMAGE)  # read from disk, not encoded again
    assert service.encoder_passes() == 1



# -- the ONNX export does not hold the model (review: clicks waited for an export) ----------------------------

class Paused:
    """Replaces a function by one that counts its calls, signals the first, and waits for ``release`` before
    running the real one (the SAM model and the export stay real; only their timing is controlled)."""

    def __init__(self, monkeypatch, owner, name: str) -> None:
        import threading

        self.real = getattr(owner, name)
        self.calls = 0
        self.started, self.release = threading.Event(), threading.Event()
        self._lock = threading.Lock()
        monkeypatch.setattr(owner, name, self)

    def __call__(self, *args, **kwargs):
        with self._lock:
            self.calls += 1
        self.started.set()
        assert self.release.wait(120), "the test never released the paused call"
        return self.real(*args, **kwargs)


def _start(fn, *args, **kwargs):
    import threading

    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def _finish(thread, result):
    thread.join(120)
    assert not thread.is_alive()
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_a_prompt_on_the_model_is_decoded_while_its_onnx_decoder_is_exported(colab, monkeypatch):
    import torch

    segmenter = colab.models.get(TINY_ID)
    embedding = segmenter.embed(IMAGE, tiling=False)
    export = Paused(monkeypatch, torch.onnx, "export")
    exporting = _start(colab.get_onnx_model, TINY_ID, quantize=False)
    try:
        assert export.started.wait(60)  # the export is in progress (paused inside torch.onnx.export)
        clicked = _start(segmenter.segment, embedding, points=[[60.5, 90.5]], point_labels=[1])
        clicked[0].join(30)
        assert not clicked[0].is_alive(), "a SAM prompt waited for the ONNX export of its model"
        assert _finish(*clicked).mask.shape == (180, 120)
    finally:
        export.release.set()
    data = _finish(*exporting)
    assert export.calls == 1 and colab.get_onnx_model(TINY_ID, quantize=False) is data
    ort.InferenceSession(data, providers=["CPUExecutionProvider"])  # the export from the copy is a model


def test_another_decoder_is_exported_while_one_is_quantised(colab, monkeypatch):
    """Two (model, quantize) keys do not queue behind one lock: only torch's exporter call itself is serialised
    (it keeps process-wide state), so the unquantised decoder is exported while the quantised one is in
    onnxruntime's quantize_dynamic."""
    import onnxruntime.quantization

    quantizing = Paused(monkeypatch, onnxruntime.quantization, "quantize_dynamic")
    small = _start(colab.get_onnx_model, TINY_ID, quantize=True)
    try:
        assert quantizing.started.wait(60)
        full = _start(colab.get_onnx_model, TINY_ID, quantize=False)
        full[0].join(60)
        assert not full[0].is_alive(), "the export of another key waited for the quantisation of the first"
        full = _finish(*full)
    finally:
        quantizing.release.set()
    small = _finish(*small)
    assert quantizing.calls == 1 and len(small) < len(full) / 2


def test_concurrent_requests_for_one_decoder_export_it_once(colab, monkeypatch):
    import time

    import torch

    export = Paused(monkeypatch, torch.onnx, "export")
    first = _start(colab.get_onnx_model, TINY_ID, quantize=False)
    try:
        assert export.started.wait(60)
        others = [_start(colab.get_onnx_model, TINY_ID, False) for _ in range(3)]
        time.sleep(0.3)  # they reach the export of the same key and wait for it
        assert all(thread.is_alive() for thread, _ in others)
    finally:
        export.release.set()
    data = _finish(*first)
    assert isinstance(data, bytes) and all(_finish(*other) is data for other in others)
    assert export.calls == 1 and colab.get_onnx_model(TINY_ID, quantize=False) is data
