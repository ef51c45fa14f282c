"""The one configuration object of colabel.

Every knob lives in :class:`ColabelConfig`; the command line fills it from flags, tests build it directly,
and environment variables ``COLABEL_<FIELD>`` override the defaults.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field


class ColabelConfig(BaseModel):
    """Settings of a colabel provider and its services.

    Sizes are in bytes, times in seconds.
    """

    host: str = Field("127.0.0.1", description="address the embedded Hypha server binds")
    port: int = Field(9527, ge=1, le=65535, description="port of the embedded Hypha server")
    server_url: str | None = Field(None, description="existing Hypha server to use instead of starting one")
    token: str | None = Field(None, description="token for --server-url")
    public_url: str | None = Field(None, description="base URL annotators use to reach the Hypha server")
    name: str = Field("colabel", pattern=r"^[a-z0-9][a-z0-9-]{0,39}$", description="provider name, used in service ids")
    max_annotation_bytes: int = Field(16 * 2**20, gt=0, description="largest GeoJSON a save accepts")
    max_features: int = Field(100_000, gt=0, description="most features in one saved annotation")
    max_image_bytes: int = Field(256 * 2**20, gt=0, description="largest pixel payload one get_image returns")
    max_session_bytes: int = Field(0, ge=0, description="most bytes the annotations of one session may take on "
                                   "disk (every version's GeoJSON and label TIFF, all annotators); 0: no limit")
    min_free_bytes: int = Field(512 * 2**20, ge=0, description="free bytes a save leaves on the annotations' file "
                                "system at least; a save that would leave less is refused; 0: no floor")
    pixel_cache_bytes: int = Field(512 * 2**20, ge=0, description="decoded PNG/JPEG pixels (and their computed "
                                   "levels) kept in memory, least recently used dropped first; 0 keeps none")
    ready_timeout: float = Field(60.0, gt=0, description="seconds to wait for the embedded Hypha server")
    assignment_lease: float = Field(3600.0, gt=0, description="seconds an unsaved image assigned to an annotator "
                                    "stays theirs alone before others may get it")
    ws_msg_rate_limit: int = Field(100_000, gt=0, description="Hypha websocket messages per second per connection")

    @classmethod
    def from_env(cls, **overrides) -> "ColabelConfig":
        """Defaults, then ``COLABEL_<FIELD>`` environment variables, then ``overrides`` (None ignored)."""
        values: dict = {}
        for name in cls.model_fields:
            env = os.environ.get(f"COLABEL_{name.upper()}")
            if env is not None:
                values[name] = env
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def annotations_dir(folder: Path) -> Path:
    """Where a mounted folder's annotations live: ``FOLDER/annotations``."""
    return Path(folder) / "annotations"
