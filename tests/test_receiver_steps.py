"""The replica's side of a resumable transfer (replicator/receiver.py,
`next_step`): what each answer to a request for a stream object
(`GET /v1/streams/DIGEST`, perhaps through an HTTP cache) means, as a pure
function of its status, its headers, the bytes the replica already holds and
the length the signed stream record gives. As any user.

The replica asks `Range: bytes=HAVE-` once it holds HAVE bytes. The object
never changes, so any answer that continues it will do: 206 from HAVE, or
200 with the whole stream (a cache that ignores ranges: the first HAVE bytes
are skipped); 416 when HAVE is already the whole stream; 404 or 410 when the
source no longer has it (the master withdrew the record).
"""

from __future__ import annotations

import pytest
import urllib3

from replicator.receiver import Step, next_step

TOTAL = 200


def headers(content_range: str | None = None, length: str | None = None) -> urllib3.HTTPHeaderDict:
    """Headers as urllib3 gives them: names in any case."""
    found = urllib3.HTTPHeaderDict({"content-type": "application/octet-stream"})
    if content_range is not None:
        found["content-range"] = content_range
    if length is not None:
        found["content-length"] = length
    return found


# --- 200: the whole object ------------------------------------------------------------------


@pytest.mark.parametrize("have", [0, 1, 100, TOTAL - 1])
def test_200_is_the_whole_stream_whatever_was_asked(have):
    """From the start of a transfer, or from a cache that ignored the Range:
    the same bytes by construction, so the replica skips what it holds."""
    assert next_step(200, headers(length=str(TOTAL)), have, TOTAL) == Step("whole")
    assert next_step(200, headers(), have, TOTAL) == Step("whole")  # chunked: no length


def test_200_of_another_length_than_the_record_is_not_trusted():
    step = next_step(200, headers(length="199"), 0, TOTAL)
    assert step.kind == "wrong" and "199" in step.why


# --- 206: the rest --------------------------------------------------------------------------


@pytest.mark.parametrize("content_range, have", [
    ("bytes 100-199/200", 100),  # the rest
    ("bytes 0-199/200", 0),
    ("bytes 100-149/200", 100),  # part of the rest: another request follows
    ("bytes 100-199/*", 100),  # a source that does not say the total
])
def test_206_that_continues_the_stream(content_range, have):
    assert next_step(206, headers(content_range), have, TOTAL) == Step("part")


@pytest.mark.parametrize("content_range", [
    "bytes 50-199/200",  # starts before what we have: bytes would be fed twice
    "bytes 150-199/200",  # starts after: a hole in the stream
    None,  # no Content-Range at all
    "",
    "bytes 100-199",  # no total
    "bytes */200",  # the form of a 416, not of a 206
    "items 100-199/200",
    "bytes 100-199/200 ",
    "bytes 100-abc/200",
])
def test_206_that_does_not_continue_the_stream_fails(content_range):
    step = next_step(206, headers(content_range), 100, TOTAL)
    assert step.kind == "failed" and not step.resumable
    assert step.why == "the source answered a range that does not continue the stream"


def test_206_of_another_object_length_is_not_trusted():
    step = next_step(206, headers("bytes 100-299/300"), 100, TOTAL)
    assert step.kind == "wrong" and "300" in step.why


# --- 416: nothing left ----------------------------------------------------------------------


def test_416_for_the_whole_stream_is_done():
    """HAVE is the stream's length: the spool holds all of it (a replica cut
    off after the last byte, before it accepted the version)."""
    assert next_step(416, headers("bytes */200"), TOTAL, TOTAL) == Step("done")


@pytest.mark.parametrize("have", [0, 100, TOTAL - 1])
def test_416_short_of_the_end_is_refused(have):
    step = next_step(416, headers("bytes */200"), have, TOTAL)
    assert step.kind == "failed" and not step.resumable
    assert step.why == "the source refused the resume range"


# --- the object is gone; anything else ------------------------------------------------------


@pytest.mark.parametrize("status", [404, 410])
def test_a_stream_the_source_no_longer_has_sends_the_replica_back_to_the_record(status):
    assert next_step(status, headers(), 100, TOTAL) == Step("gone")


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_5xx_fails_and_may_resume(status):
    """The master failed, or a proxy did, or it is busy: what is held may be
    continued; the source's own error text is reported (why is None)."""
    for have in (0, 100):
        assert next_step(status, headers(), have, TOTAL) == Step("failed", why=None, resumable=True)


@pytest.mark.parametrize("status", [400, 401, 403, 409, 413, 304, 204, 100, 307])
def test_other_statuses_fail_for_good(status):
    """4xx: the request itself was refused (wrong token...); other statuses
    are not answers to a request for an object. The spool is dropped."""
    for have in (0, 100):
        assert next_step(status, headers("bytes 100-199/200"), have, TOTAL) == Step("failed", why=None,
                                                                                     resumable=False)
