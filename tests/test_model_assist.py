"""ModelAssist's own checks, in-process: what an annotator may send is refused before it leaves the provider.

A recording stand-in plays the Hypha connection (``direct=False``: every model call goes through
``server.get_service(...).call_packed``), so these tests see exactly which calls leave the provider.
"""

from __future__ import annotations

import numpy as np
import pytest

from colabel.apps.provider.assist import ModelAssist, ModelServiceUnavailable
from colabel.errors import InvalidInputError
from colabel.services.sam.segmenter import MAX_POINTS

pytestmark = [pytest.mark.unit, pytest.mark.asyncio(loop_scope="session")]


class RecordingService:
    def __init__(self, name: str, calls: list, answers: dict) -> None:
        self.name, self.calls, self.answers = name, calls, answers

    async def call_packed(self, method: str, *args):
        self.calls.append((self.name, method, args))
        answer = self.answers.get((self.name, method), {})
        if isinstance(answer, Exception):  # the model service's error, as hypha-rpc raises it
            raise answer
        return answer


class RecordingServer:
    """``get_service(id)`` -> a service recording ``(service, method, args)`` of every call."""

    def __init__(self, answers: dict | None = None) -> None:
        self.calls: list[tuple] = []
        self.answers = answers or {}

    async def get_service(self, service_id: str):
        return RecordingService(service_id.split(":")[-1], self.calls, self.answers)


class Provider:
    """The two provider functions ModelAssist uses, for one image ``img-1``."""

    def _check_in_session(self, session, image_id: str) -> str:
        if image_id != "img-1":
            raise InvalidInputError(f"unknown image id {image_id!r}")
        return image_id

    def get_image(self, image_id: str, *, session=None) -> np.ndarray:
        return np.zeros((32, 32), np.uint8)


def assist_with(answers: dict | None = None, **kwargs) -> tuple[ModelAssist, RecordingServer]:
    server = RecordingServer(answers)
    ids = {"sam": "ws/x:sam", "nuclei": "ws/x:nuclei"}
    return ModelAssist(Provider(), server, ids, sam_model="tiny", direct=False, **kwargs), server


async def test_a_prompt_with_too_many_points_is_refused_before_any_model_call():
    assist, server = assist_with({("sam", "embed"): {"embedding_id": "e1"}})
    many = [[1.0, 1.0]] * (MAX_POINTS + 1)
    for points in (many, np.asarray(many)):
        with pytest.raises(InvalidInputError, match=f"at most {MAX_POINTS} points, got {MAX_POINTS + 1}"):
            await assist.sam_segment(None, "img-1", {"points": points, "labels": [1] * (MAX_POINTS + 1)})
    assert server.calls == []
    await assist.sam_segment(None, "img-1", {"points": many[:MAX_POINTS], "labels": [1] * MAX_POINTS})
    assert [c[1] for c in server.calls] == ["embed", "segment"]


async def test_annotators_may_only_use_the_providers_nucleus_backend():
    assist, server = assist_with({("nuclei", "info"): {"default_backend": "classical"},
                                  ("nuclei", "segment"): {"count": 0}})
    for backend in ("hovernet", "no-such-backend", 3):
        with pytest.raises(InvalidInputError,
                           match="detects nuclei with the backend 'classical', not ('hovernet'|'no-such-backend'|3)$"):
            await assist.detect_nuclei(None, "img-1", None, backend)
    assert [c[1] for c in server.calls] == ["info"]  # read once; nothing segmented
    await assist.detect_nuclei(None, "img-1", None, None)
    await assist.detect_nuclei(None, "img-1", None, "classical")
    assert [(c[1], c[2][2]) for c in server.calls[1:]] == [("segment", None), ("segment", "classical")]

    configured, server = assist_with(nuclei_backend="hovernet")
    await configured.detect_nuclei(None, "img-1", None, "hovernet")
    with pytest.raises(InvalidInputError, match="backend 'hovernet', not 'classical'"):
        await configured.detect_nuclei(None, "img-1", None, "classical")
    assert [c[1] for c in server.calls] == ["segment"]  # a configured backend needs no info call


async def test_a_failing_model_service_is_logged_on_the_providers_console_once_per_kind(caplog):
    failure = Exception("colabel.services.weights.WeightsUnavailableError: Could not obtain the weights of model "
                        "'sam_vit_b_lm' from https://example.org/vit_b.pt (ConnectError)")
    assist, _ = assist_with({("sam", "embed"): failure})
    with caplog.at_level("WARNING", logger="colabel.apps.provider.assist"):
        for _ in range(3):  # every annotator's click fails, and is told why
            with pytest.raises(ModelServiceUnavailable, match="sam.embed failed: .*WeightsUnavailableError"):
                await assist.sam_segment(None, "img-1", {"points": [[1.0, 1.0]], "labels": [1]})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # the provider sees it without flooding the console
    assert "the sam model service failed" in warnings[0] and "Could not obtain the weights" in warnings[0]
