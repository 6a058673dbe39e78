"""IngressCore's placement: a replica found full after its grant is given back and the stream placed again."""

from __future__ import annotations

import asyncio

import pytest

from deployments import ingress
from deployments.config import ServiceConfig
from deployments.messages import AdmissionGrant, OpenRequest
from stages.errors import AdmissionRefusedError, BadRequestError


class _Method:
    def __init__(self, fn) -> None:
        self.fn, self.calls = fn, []

    def remote(self, *args, **kwargs):
        self.calls.append(args)

        async def run():
            return self.fn(*args, **kwargs)

        return run()


class _Router:
    def __init__(self) -> None:
        self.admit = _Method(lambda sid, req: AdmissionGrant(stream_id=sid, pipeline="pool", replica="",
                                                                   predicted_ttff_ms=100.0))
        self.release = _Method(lambda sid: None)


class _Pipeline:
    def __init__(self, outcomes: list) -> None:
        def open_(sid, req, opened_us, replica=""):
            outcome = outcomes.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
        self.open = _Method(open_)


def _full() -> AdmissionRefusedError:
    return AdmissionRefusedError("pipeline Pipeline-0-tiny has all 1 stream slots in use", pipeline="Pipeline-0-tiny")


def _place(outcomes: list):
    router, pipeline = _Router(), _Pipeline(outcomes)
    core = ingress.IngressCore(ServiceConfig(), router, {"pool": pipeline})
    req = OpenRequest(prompt="x", height=64, width=64)
    try:
        return asyncio.run(core._place("s1", req, 0)), router, pipeline
    except BaseException as exc:
        return exc, router, pipeline


@pytest.fixture(autouse=True)
def _no_pause(monkeypatch):
    monkeypatch.setattr(ingress, "OPEN_RETRY_S", 0.0)


def test_a_replica_full_after_its_grant_is_retried_and_the_stream_opens():
    grant, router, pipeline = _place([_full(), None])
    assert isinstance(grant, AdmissionGrant) and grant.stream_id == "s1"
    assert len(router.admit.calls) == 2 and len(pipeline.open.calls) == 2
    assert router.release.calls == [("s1",)]  # the first grant was given back, the second is kept


def test_full_every_time_reaches_the_client_after_the_attempts():
    exc, router, pipeline = _place([_full() for _ in range(ingress.OPEN_ATTEMPTS)])
    assert isinstance(exc, AdmissionRefusedError) and "stream slots in use" in str(exc)
    assert len(router.admit.calls) == len(router.release.calls) == ingress.OPEN_ATTEMPTS


@pytest.mark.parametrize("error", [
    AdmissionRefusedError("pipeline P serves wan-14b, not tiny"),  # no replica would take it: no retry
    BadRequestError("bad frame size", field="height"),
])
def test_other_refusals_and_errors_end_the_open_at_once(error):
    exc, router, pipeline = _place([error, None])
    assert exc is error
    assert len(router.admit.calls) == 1 and router.release.calls == [("s1",)]
