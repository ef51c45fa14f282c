"""SAM registry and checkpoint loading with tiny real checkpoints made here."""

from __future__ import annotations

import dataclasses
import socket
import subprocess
import sys

import pytest
import torch
from sam_fixtures import (
    TINY,
    TINY_ID,
    tiny_checkpoint_fixture,  # noqa: F401
    tiny_checkpoints_fixture,  # noqa: F401
    tiny_sam_fixture,  # noqa: F401
    torch_one_thread_fixture,  # noqa: F401
)

from colabel.errors import InvalidInputError, NotFoundError
from colabel.services.sam import registry
from colabel.services.sam.registry import (
    MODELS,
    SamConfig,
    build_sam,
    infer_config,
    load_sam,
    read_checkpoint,
    resolve,
    save_checkpoint,
)
from colabel.services.weights import WeightsUnavailableError

pytestmark = pytest.mark.unit


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


def test_published_models_table():
    expected = {
        "sam_vit_b": ("vit_b", "xxh128:6923c33df3637b6a922d7682bfc9a86b", "sam_vit_b_01ec64.pth"),
        "sam_vit_l": ("vit_l", "xxh128:a82beb3c660661e3dd38d999cc860e9a", "sam_vit_l_0b3195.pth"),
        "sam_vit_h": ("vit_h", "xxh128:97698fac30bd929c2e6d8d8cc15933c2", "sam_vit_h_4b8939.pth"),
        "sam_vit_b_lm": ("vit_b", "xxh128:fe9252a29f3f4ea53c15a06de471e186", "diplomatic-bug/1.2/files/vit_b.pt"),
        "sam_vit_l_lm": ("vit_l", "xxh128:017f20677997d628426dec80a8018f9d", "idealistic-rat/1.2/files/vit_l.pt"),
        "sam_vit_b_em_organelles": ("vit_b", "xxh128:f3bf2ed83d691456bae2c3f9a05fb438", "noisy-ox/1.2/files/vit_b.pt"),
        "sam_vit_l_em_organelles": ("vit_l", "xxh128:810b084b6e51acdbf760a993d8619f2d",
                                    "humorous-crab/1.2/files/vit_l.pt"),
        "sam_vit_b_histopathology": ("vit_b", "xxh128:ffd1a2cd84570458b257bd95fdd8f974", "sBB4H8CTmIoBZsQ/download"),
    }
    assert set(MODELS) == set(expected)
    filenames = set()
    for model_id, (arch, checksum, url_end) in expected.items():
        spec = MODELS[model_id]
        assert (spec.arch, spec.checksum) == (arch, checksum)
        assert spec.url.endswith(url_end) and spec.url.startswith("https://")
        filenames.add(spec.filename)
    assert len(filenames) == len(expected)  # several URLs end in vit_b.pt: cached names must differ


def test_tiny_checkpoint_round_trip(tiny_sam, tiny_checkpoints):
    sam, spec = load_sam(TINY_ID, checkpoints=tiny_checkpoints, device="cpu")
    assert spec.model_id == TINY_ID and spec.local_path == tiny_checkpoints[TINY_ID]
    assert sam.colabel_config == SamConfig(**{**TINY, "global_attn_indexes": (1,)})
    assert sam.image_encoder.img_size == 256
    assert same_weights(sam, tiny_sam)


@pytest.mark.parametrize("layout", ["micro_sam", "plain", "model"])
def test_other_layouts_load_by_shape(tiny_sam, tmp_path, layout):
    path = save_checkpoint(tiny_sam, tmp_path / f"{layout}.pt", layout=layout)
    raw = torch.load(path, weights_only=True)
    if layout == "micro_sam":
        assert all(k.startswith("sam.") for k in raw["model_state"])
    # an unknown id with a plain path: architecture read from the weights ("auto")
    sam, spec = load_sam("mine", checkpoints={"mine": path}, device="cpu")
    assert spec.arch == "auto" and same_weights(sam, tiny_sam)
    # a declared architecture that does not fit: the weights win (with a warning), nothing loads wrong
    sam2, _ = load_sam("mine", checkpoints={"mine": ("vit_b", path)}, device="cpu")
    assert same_weights(sam2, tiny_sam)


def test_micro_sam_checkpoint_with_unimportable_objects(tiny_sam, tmp_path, monkeypatch):
    """torch_em checkpoints pickle trainer objects; classes that cannot be imported are skipped."""
    (tmp_path / "trainer_mod.py").write_text("class TrainerConfig:\n    lr = 1e-5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import trainer_mod

    state = {f"sam.{k}": v for k, v in tiny_sam.state_dict().items()}
    torch.save({"model_state": state, "config": trainer_mod.TrainerConfig()}, tmp_path / "micro.pt")
    del sys.modules["trainer_mod"]
    (tmp_path / "trainer_mod.py").unlink()  # the class is no longer importable, as on a user's machine

    state, config = read_checkpoint(tmp_path / "micro.pt")
    assert config is None and "image_encoder.pos_embed" in state
    with pytest.raises(InvalidInputError, match="not trusted"):
        read_checkpoint(tmp_path / "micro.pt", trusted=False)
    sam, _ = load_sam("micro", checkpoints={"micro": ("auto", tmp_path / "micro.pt")}, device="cpu")
    assert same_weights(sam, tiny_sam)


def test_infer_config_of_published_architectures():
    with torch.device("meta"):  # shapes only: no memory, no time
        for arch in ("vit_b", "vit_l", "vit_h"):
            sam = build_sam(arch)
            assert infer_config(sam.state_dict()) == registry.sam_config(arch)


def test_unknown_model_id_lists_known_ids():
    with pytest.raises(NotFoundError) as info:
        resolve("sam_vit_x")
    message = str(info.value)
    assert "sam_vit_x" in message and "sam_vit_b_lm" in message and "sam_vit_b_histopathology" in message


def test_bad_checkpoint_entries(tmp_path):
    with pytest.raises(InvalidInputError, match="architecture"):
        resolve("m", checkpoints={"m": ("vit_q", tmp_path / "x.pt")})
    with pytest.raises(InvalidInputError, match="path or"):
        resolve("m", checkpoints={"m": 42})
    with pytest.raises(NotFoundError, match="does not exist"):
        load_sam("sam_vit_b", checkpoints={"sam_vit_b": tmp_path / "missing.pt"})
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InvalidInputError, match="cannot be read"):
        load_sam("junk", checkpoints={"junk": tmp_path / "junk.pt"})
    torch.save({"model_state": {"something.else": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(InvalidInputError, match="no SAM image encoder"):
        load_sam("other", checkpoints={"other": tmp_path / "other.pt"})


def test_local_override_of_published_id(tiny_checkpoint):
    spec = resolve("sam_vit_b", checkpoints={"sam_vit_b": tiny_checkpoint})
    assert spec.local_path == tiny_checkpoint and spec.url is None and spec.arch == "vit_b"


def test_missing_weights_offline_is_a_clear_error(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    offline = dataclasses.replace(MODELS["sam_vit_b_lm"], url=f"http://127.0.0.1:{port}/diplomatic-bug/vit_b.pt")
    monkeypatch.setitem(MODELS, "sam_vit_b_lm", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        load_sam("sam_vit_b_lm", cache_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "sam_vit_b_lm" in message and offline.url in message and "local checkpoint" in message
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_config_validation():
    with pytest.raises(InvalidInputError, match="multiple of patch_size"):
        SamConfig(image_size=250)
    with pytest.raises(InvalidInputError, match="global_attn_indexes"):
        SamConfig(depth=2, global_attn_indexes=(5,))
    with pytest.raises(InvalidInputError, match="unknown SAM config keys"):
        SamConfig.from_dict({"bogus": 1})
    with pytest.raises(InvalidInputError, match="unknown SAM architecture"):
        registry.sam_config("vit_q")


def test_package_import_is_light():
    """``import colabel.services.sam`` pulls in neither torch nor segment_anything, ray or hypha_rpc."""
    code = (
        "import sys, colabel.services.sam, colabel.services.sam.registry, colabel.services.sam.segmenter, "
        "colabel.services.sam.colab, colabel.services.weights, colabel.services.torchvision_compat;"
        "print(sorted(m for m in ('torch', 'segment_anything', 'ray', 'hypha_rpc', 'torchvision') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_no_transport_imports_in_sources():
    """The layering rule: nothing under services/sam, weights.py, torchvision_compat.py imports ray or hypha_rpc."""
    import ast
    from pathlib import Path

    import colabel.services.sam as pkg

    root = Path(pkg.__file__).parent
    files = list(root.glob("*.py")) + [root.parent / "weights.py", root.parent / "torchvision_compat.py"]
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in ("ray", "hypha_rpc"), f"{f.name} imports {name}"
