"""Real demo images for ``colabel serve --demo`` and the benchmarks.

* ``ihc_ki67.png``: scikit-image's ``data.immunohistochemistry()``, 512x512 RGB, IHC with DAB (brown,
  Ki-67-like) and hematoxylin (blue) — shipped with scikit-image.
* ``dsb2018_nuclei.tif``: a 512x512 16-bit fluorescence image of the Data Science Bowl 2018 (stage 1
  training set, CC0) with 125 hand-labelled nuclei, as shipped by StarDist (BSD-3); its labels are
  ``colabel/data/dsb2018_nuclei_mask.tif`` and are not copied into the demo folder.
"""

from __future__ import annotations

import shutil
from importlib.resources import files
from pathlib import Path

DATA = Path(str(files("colabel"))) / "data"


def data_path(name: str) -> Path:
    """Path of a file shipped in ``colabel/data``."""
    path = DATA / name
    if not path.is_file():
        raise FileNotFoundError(f"colabel's data file {name} is missing from {DATA}")
    return path


def write_demo_folder(folder: Path) -> list[Path]:
    """Write the demo images into ``folder`` (created if needed); existing files are left as they are.

    Raises
    ------
    InvalidInputError
        ``folder`` is a file, or cannot be created or written (the operating system's reason).
    """
    import imageio.v3 as iio
    from skimage import data

    from colabel.errors import InvalidInputError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InvalidInputError(f"{folder} is not a folder; the demo images need one")
    written = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        ihc = folder / "ihc_ki67.png"
        if not ihc.exists():
            iio.imwrite(ihc, data.immunohistochemistry())
        written.append(ihc)
        dsb = folder / "dsb2018_nuclei.tif"
        if not dsb.exists():
            shutil.copyfile(data_path("dsb2018_nuclei.tif"), dsb)
        written.append(dsb)
    except OSError as exc:
        raise InvalidInputError(f"cannot write the demo images into {folder}: {exc.strerror or exc}") from None
    return written
