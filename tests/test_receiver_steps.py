"""The replica's side of a resumable transfer (replicator/receiver.py,
`next_step`): what each answer of the master to a stream request means,
as a pure function of its status, its headers and the bytes the replica
already holds. As any user.

The replica asks `Range: bytes=HAVE-` with `If-Range: "<stream id>"` once it
holds HAVE bytes; the master answers 206 with the part that exists
(`bytes HAVE-END/TOTAL`, TOTAL `*` while its spool still grows), 200 with a
whole new stream (none asked for, or the stream id changed), or 416 when
HAVE is the whole stream already.
"""

from __future__ import annotations

import pytest
import urllib3

from replicator.receiver import Step, next_step


def range_headers(value: str | None) -> urllib3.HTTPHeaderDict:
    """Headers as urllib3 gives them: names in any case."""
    headers = urllib3.HTTPHeaderDict({"content-type": "application/octet-stream"})
    if value is not None:
        headers["content-range"] = value
    return headers


# --- 200: a whole stream --------------------------------------------------------------------


def test_200_for_a_fresh_transfer_begins_the_stream():
    step = next_step(200, range_headers(None), 0)
    assert step == Step("begin", complete=True)
    assert step.why is None and not step.resumable


@pytest.mark.parametrize("have", [1, 4 << 20, 10**12])
def test_200_when_resuming_means_the_stream_changed(have):
    """The master ignored If-Range: its stream id is not ours (it restarted its
    spool). What the spool holds belongs to another stream: start over."""
    step = next_step(200, range_headers(None), have)
    assert step.kind == "failed" and not step.resumable
    assert step.why == "the master's stream changed; starting over"


# --- 206: the rest of the stream ---------------------------------------------------------------


@pytest.mark.parametrize("content_range, have, complete", [
    ("bytes 100-199/200", 100, True),  # the rest, to the end of a complete spool
    ("bytes 0-0/1", 0, True),
    ("bytes 100-149/200", 100, False),  # part of the rest: another request follows
    ("bytes 100-199/*", 100, False),  # the spool still grows: total unknown
    ("bytes 4194304-8388607/*", 4 << 20, False),
])
def test_206_that_continues_the_spool(content_range, have, complete):
    step = next_step(206, range_headers(content_range), have)
    assert step == Step("continue", complete=complete)


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
def test_206_that_does_not_continue_the_spool_fails(content_range):
    step = next_step(206, range_headers(content_range), 100)
    assert step.kind == "failed" and not step.resumable
    assert step.why == "master answered a range that does not continue the spool"


# --- 416: nothing left -----------------------------------------------------------------------


def test_416_for_the_whole_stream_is_done():
    """HAVE is the stream's length: the spool holds all of it (a replica cut
    off after the last byte, before it accepted the version)."""
    assert next_step(416, range_headers("bytes */200"), 200) == Step("done")


@pytest.mark.parametrize("content_range", [
    "bytes */300",  # HAVE is short of the total: the master should have sent the rest
    "bytes */100",  # HAVE is beyond the stream's end
    "bytes */*",  # the master does not know the total
    None,
    "bytes 0-199/200",
])
def test_416_otherwise_is_refused(content_range):
    step = next_step(416, range_headers(content_range), 200)
    assert step.kind == "failed" and not step.resumable
    assert step.why == "master refused the resume range"


# --- anything else --------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_fails_and_may_resume(status):
    """The master failed (or a proxy did): the spool may be continued later;
    the master's own error text is reported (why is None)."""
    for have in (0, 1000):
        step = next_step(status, range_headers(None), have)
        assert step == Step("failed", why=None, resumable=True)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 429, 304, 204, 100])
def test_other_statuses_fail_for_good(status):
    """4xx: the request itself was refused (wrong token, no such version...);
    other statuses are not answers to a stream request. The spool is dropped."""
    for have in (0, 1000):
        step = next_step(status, range_headers("bytes 1000-1999/2000"), have)
        assert step == Step("failed", why=None, resumable=False)
