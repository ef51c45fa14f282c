"""Typed records that cross the wire between the provider, annotators and trainers.

Conventions used everywhere in colabel:

* pixel arrays are numpy ``(height, width, channels)``, ``channels >= 1``, in the file's own dtype;
* GeoJSON coordinates are ``[x, y]`` pixels of the full-resolution image, ``x`` = column and ``y`` = row,
  origin at the top-left corner of the top-left pixel (QuPath's convention);
* times are ISO 8601 strings in UTC.

Functions return ``model.model_dump(mode="json")`` so that any hypha-rpc client (Python or JavaScript)
gets plain objects.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

HEX_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")


class Region(BaseModel):
    """A rectangle of an image level, in pixels of that level: columns ``x .. x+width``, rows ``y .. y+height``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    x: int = Field(ge=0)
    y: int = Field(ge=0)
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class ImageInfo(BaseModel):
    """One image of the mounted folder.

    ``shape`` is ``(height, width, channels)`` of level 0; ``levels`` lists ``(height, width)`` of every
    resolution level that ``get_image(level=n)`` serves (level ``n`` is downsampled ``2**n`` times unless
    the file has its own pyramid). ``error`` is set, and the other pixel fields are empty, when the file
    cannot be read. ``annotations`` counts saved versions per annotator id in the session asked about, and
    ``finished`` names the annotators who finished the image there, ``returned`` those it was returned to.
    """

    image_id: str
    name: str = Field(description="file name relative to the mounted folder, for display only")
    format: str
    shape: list[int] | None = None
    dtype: str | None = None
    channels: int | None = None
    levels: list[list[int]] = Field(default_factory=list)
    error: str | None = None
    revision: str | None = Field(None, description="changes whenever the file is rewritten or replaced (its size "
                                 "and modification time); None when the file cannot be read")
    status: Literal["unannotated", "in_progress", "annotated", "unreadable"] = "unannotated"
    annotations: dict[str, int] = Field(default_factory=dict)
    finished: dict[str, int] = Field(default_factory=dict, description="annotator id -> their latest version when "
                                     "they said they finished the image (finish_image; the page's next image)")
    returned: dict[str, str] = Field(default_factory=dict, description="annotator id -> what the provider asked them "
                                     "to change, for an image returned to them and not finished since")


class LabelClass(BaseModel):
    """A label class of a session: a name and a ``#rrggbb`` colour."""

    name: str = Field(min_length=1, max_length=64)
    color: str = "#ff0000"

    @field_validator("color")
    @classmethod
    def _hex(cls, value: str) -> str:
        if not HEX_COLOR.match(value):
            raise ValueError(f"colour {value!r} is not of the form #rrggbb")
        return value.lower()

    @field_validator("name")
    @classmethod
    def _printable(cls, value: str) -> str:
        if not value.isprintable() or value.strip() != value:
            raise ValueError(f"class name {value!r} must be printable without surrounding spaces")
        return value

    def rgb(self) -> list[int]:
        """The colour as QuPath's ``[r, g, b]`` integers."""
        return [int(self.color[i : i + 2], 16) for i in (1, 3, 5)]


class TokenInfo(BaseModel):
    """A share token of a session; the secret itself is never listed.

    ``role`` ``"annotate"`` opens the annotator functions; ``"train"`` opens only the read-only trainer
    functions (pull images and labels), never annotation.
    """

    token_id: str
    role: Literal["annotate", "train"] = "annotate"
    label: str = ""
    created: str
    revoked: str | None = None


class SessionInfo(BaseModel):
    """An annotation session as the provider sees it."""

    session_id: str
    name: str
    mode: Literal["segmentation", "classification"] = "segmentation"
    classes: list[LabelClass]
    annotators_per_image: int = Field(1, ge=1)
    image_ids: list[str] | None = Field(None, description="the images of the session; None means all")
    created: str
    state: Literal["open", "closed"] = "open"
    tokens: list[TokenInfo] = Field(default_factory=list)


class AnnotatorSession(BaseModel):
    """What an annotator is told about the session its token opens (no tokens, no other sessions)."""

    session_id: str
    name: str
    mode: str
    classes: list[LabelClass]
    state: str
    n_images: int


class Annotator(BaseModel):
    """An annotator who joined a session: a server-made id and the display name they gave."""

    annotator_id: str
    display_name: str
    joined: str


class AnnotationRecord(BaseModel):
    """One saved version of one annotator's annotation of one image."""

    session_id: str
    image_id: str
    annotator_id: str
    display_name: str
    version: int = Field(ge=1)
    saved_at: str
    n_features: int
    geojson_file: str = Field(description="path relative to the mounted folder")
    label_file: str = Field(description="instance-label TIFF, path relative to the mounted folder")
    writer: str | None = Field(None, description="the writer id the save was sent with (one per page or client), "
                                                 "which tells a client's own saves from another's after a lost answer")


class Assignment(BaseModel):
    """The image an annotator should work on next, and where they are in the session."""

    image: ImageInfo | None = Field(None, description="None when every image has its annotators")
    position: int = Field(description="1-based index of the image in the session, 0 when done")
    total: int
    returned: dict | None = Field(None, description="{version, comment, at} when the provider returned this image to "
                                  "the annotator for changes (return_image), else None")


class Progress(BaseModel):
    """Session progress: images with all their annotators done (saved on) and finished, and work per annotator."""

    session_id: str
    n_images: int
    images_done: int
    images_in_progress: int
    images_finished: int = Field(0, description="images finished (finish_image) by annotators_per_image annotators")
    per_annotator: dict[str, dict] = Field(
        default_factory=dict, description="annotator id -> {display_name, images, finished, versions, stored_bytes}"
    )
    stored_bytes: int = Field(0, description="bytes the session's annotations take on disk, every version")
    max_session_bytes: int = Field(0, description="the provider's limit of stored_bytes; 0: none")
