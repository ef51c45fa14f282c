"""The torchvision stand-ins against independent references, and install()'s import logic."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from colabel.services import torchvision_compat as tc

pytestmark = pytest.mark.unit


# --------------------------------------------------------------------------------------------------
# references, written independently of the implementation (plain Python loops)
# --------------------------------------------------------------------------------------------------


def reference_nms(boxes: np.ndarray, scores: np.ndarray, cats: np.ndarray, thr: float) -> list[int]:
    """Brute force greedy NMS: highest score first (ties: lower index first), per category."""
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    removed = [False] * len(boxes)
    keep = []
    for a, i in enumerate(order):
        if removed[i]:
            continue
        keep.append(i)
        for j in order[a + 1:]:
            if removed[j] or cats[j] != cats[i]:
                continue
            ix = max(0.0, min(boxes[i][2], boxes[j][2]) - max(boxes[i][0], boxes[j][0]))
            iy = max(0.0, min(boxes[i][3], boxes[j][3]) - max(boxes[i][1], boxes[j][1]))
            inter = ix * iy
            area_i = (boxes[i][2] - boxes[i][0]) * (boxes[i][3] - boxes[i][1])
            area_j = (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1])
            union = area_i + area_j - inter
            if union > 0 and inter / union > thr:
                removed[j] = True
    return keep


def random_boxes(rng, n: int, *, integer: bool = False) -> np.ndarray:
    xy = rng.uniform(0, 100, (n, 2))
    wh = rng.uniform(1, 40, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    return np.round(boxes) if integer else boxes


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.7])
def test_batched_nms_matches_brute_force(seed, thr):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 80))
    boxes = random_boxes(rng, n, integer=seed % 2 == 0)
    scores = np.round(rng.uniform(0, 1, n), 1)  # one decimal: many ties
    cats = rng.integers(0, 3, n)
    keep = tc.batched_nms(torch.tensor(boxes, dtype=torch.float32), torch.tensor(scores, dtype=torch.float32),
                          torch.tensor(cats), thr)
    assert keep.dtype == torch.int64
    assert keep.tolist() == reference_nms(boxes.astype(np.float32), scores.astype(np.float32), cats, thr)


def test_nms_hand_checked_cases():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [5, 0, 15, 10], [30, 30, 40, 40]], dtype=torch.float32)
    scores = torch.tensor([0.5, 0.5, 0.9, 0.1])
    # box 2 (score .9) first; IoU(2, 0) = 50 / 150 = 1/3; identical boxes 0, 1 tie: 0 kept, 1 suppressed
    assert tc.nms(boxes, scores, 0.5).tolist() == [2, 0, 3]
    assert tc.nms(boxes, scores, 0.3).tolist() == [2, 3]  # 1/3 > 0.3 suppresses 0 and 1
    # IoU exactly equal to the threshold does not suppress (strictly greater)
    assert tc.nms(boxes[[0, 2]], scores[[0, 2]], 1 / 3).tolist() == [1, 0]
    # different categories never suppress each other
    assert tc.batched_nms(boxes, scores, torch.tensor([0, 1, 2, 0]), 0.0).tolist() == [2, 0, 1, 3]


def test_nms_empty_and_degenerate():
    empty = tc.batched_nms(torch.zeros((0, 4)), torch.zeros(0), torch.zeros(0), 0.5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    # two zero-area boxes: IoU is 0/0 (NaN) and never suppresses, as in torchvision
    zero = torch.tensor([[1.0, 1, 1, 1], [1.0, 1, 1, 1]])
    assert tc.nms(zero, torch.tensor([0.2, 0.3]), 0.5).tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        tc.nms(torch.zeros((3, 3)), torch.zeros(3), 0.5)


def test_box_area():
    boxes = torch.tensor([[0, 0, 2, 3], [1, 1, 1, 5]], dtype=torch.int16)
    area = tc.box_area(boxes)
    assert area.tolist() == [6, 0] and area.dtype == torch.int32
    half = tc.box_area(torch.tensor([[0.0, 0.0, 1.5, 2.0]], dtype=torch.float16))
    assert half.dtype == torch.float32 and half.tolist() == [3.0]


# --------------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(37, 53, 3), (64, 20, 3), (10, 10)])
@pytest.mark.parametrize("target", [(256, 128), (5, 7), (100, 100)])
def test_resize_pil_equals_pil_bilinear(shape, target):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 256, shape, dtype=np.uint8)
    image = Image.fromarray(array)
    ours = tc.resize(image, target)
    reference = image.resize((target[1], target[0]), Image.Resampling.BILINEAR)
    assert isinstance(ours, Image.Image)
    np.testing.assert_array_equal(np.array(ours), np.array(reference))


def test_resize_int_sets_smaller_edge_and_max_size():
    image = Image.new("RGB", (200, 100))  # w=200, h=100
    assert tc.resize(image, 50).size == (100, 50)
    assert tc.resize(image, [50]).size == (100, 50)
    assert tc.resize(image, 50, max_size=80).size == (80, 40)
    tall = Image.new("L", (30, 90))
    assert tc.resize(tall, 10).size == (10, 30)


def test_resize_tensor():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    out = tc.resize(x, (4, 6))
    assert out.shape == (2, 3, 4, 6)
    ref = torch.nn.functional.interpolate(x, size=(4, 6), mode="bilinear", align_corners=False, antialias=True)
    torch.testing.assert_close(out, ref)
    assert tc.resize(torch.zeros(3, 8, 8, dtype=torch.uint8), (4, 4)).dtype == torch.uint8


def test_to_pil_image_modes():
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    image = tc.to_pil_image(rgb)
    assert image.mode == "RGB" and image.size == (7, 5)
    np.testing.assert_array_equal(np.array(image), rgb)
    assert tc.to_pil_image(rgb[..., 0]).mode == "L"
    assert tc.to_pil_image(np.zeros((4, 4, 4), np.uint8)).mode == "RGBA"
    assert tc.to_pil_image(np.zeros((4, 4, 2), np.uint8)).mode == "LA"
    assert tc.to_pil_image(np.zeros((4, 4), np.float32), mode="F").mode == "F"
    # float data other than mode F is scaled by 255 and cast to uint8, as torchvision does
    grey = tc.to_pil_image(np.full((2, 2), 0.5, np.float32))
    assert grey.mode == "L" and np.array(grey)[0, 0] == 127
    # tensors are CHW
    t = torch.zeros(3, 4, 6)
    t[0] = 1.0
    pil = tc.to_pil_image(t)
    assert pil.size == (6, 4) and np.array(pil)[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(ValueError, match="more than 4 channels"):
        tc.to_pil_image(np.zeros((2, 2, 5), np.uint8))
    with pytest.raises(TypeError):
        tc.to_pil_image([[1, 2]])


def test_sam_resize_longest_side_uses_pil_bilinear():
    """segment_anything's ResizeLongestSide.apply_image through the stand-ins equals a direct PIL resize."""
    tc.install()
    from segment_anything.utils.transforms import ResizeLongestSide

    rgb = np.random.default_rng(3).integers(0, 256, (300, 450, 3), dtype=np.uint8)
    out = ResizeLongestSide(256).apply_image(rgb)
    reference = np.array(Image.fromarray(rgb).resize((256, 171), Image.Resampling.BILINEAR))
    assert out.shape == (171, 256, 3)
    np.testing.assert_array_equal(out, reference)


# --------------------------------------------------------------------------------------------------
# install()
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def clean_torchvision(monkeypatch):
    """Remove torchvision* from sys.modules for one test and put the previous entries back after."""
    saved = {k: v for k, v in sys.modules.items() if k == "torchvision" or k.startswith("torchvision.")}
    for k in saved:
        del sys.modules[k]
    yield monkeypatch
    for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def _fake_package(root, body: str):
    pkg = root / "torchvision"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(body))
    return root


def test_install_is_noop_when_real_torchvision_imports(clean_torchvision, tmp_path):
    clean_torchvision.syspath_prepend(str(_fake_package(tmp_path, "REAL = True\n")))
    assert tc.install() is False
    assert getattr(sys.modules["torchvision"], "REAL", False) is True
    assert not tc.is_stand_in()
    assert "torchvision.ops" not in sys.modules  # nothing registered beside the real package


def test_install_replaces_a_broken_torchvision(clean_torchvision, tmp_path):
    body = """
        import sys
        sys.modules[__name__ + '._partial'] = object()  # a partial import leaves modules behind
        raise RuntimeError('operator torchvision::nms does not exist')
    """
    clean_torchvision.syspath_prepend(str(_fake_package(tmp_path, body)))
    assert tc.install() is True
    assert tc.is_stand_in()
    assert "torchvision._partial" not in sys.modules
    from torchvision.ops.boxes import batched_nms, box_area
    from torchvision.transforms.functional import resize, to_pil_image

    assert (batched_nms, box_area, resize, to_pil_image) == (tc.batched_nms, tc.box_area, tc.resize, tc.to_pil_image)
    import torchvision

    assert torchvision.ops.batched_nms is tc.batched_nms
    assert tc.install() is True  # idempotent


def test_install_when_torchvision_is_absent(clean_torchvision, tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    # shadow any torchvision on sys.path with a path entry whose finder says "not here"
    clean_torchvision.setattr(sys, "path", [str(empty)] + [p for p in sys.path if "site-packages" not in p])
    assert tc.install() is True
    assert set(tc.STAND_IN_MODULES) <= set(sys.modules)


def test_segment_anything_automatic_mask_generator_imports():
    tc.install()
    import segment_anything.automatic_mask_generator as amg
    from segment_anything import SamAutomaticMaskGenerator, SamPredictor  # noqa: F401

    assert amg.batched_nms(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([1.0]), torch.zeros(1), 0.5).tolist() == [0]
