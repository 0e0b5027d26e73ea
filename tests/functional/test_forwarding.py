"""What the upstream sees: Sprox's own signature, never the client's credentials or
hop-by-hop headers, and never a host chosen by the request."""

from __future__ import annotations

import pytest

from tests.functional.recording_upstream import RecordingUpstream
from tests.functional.test_passthrough import client_for, raw


@pytest.fixture
def upstream():
    with RecordingUpstream() as server:
        yield server


def test_client_auth_and_hop_by_hop_headers_never_reach_the_upstream(start_sprox, tmp_path, upstream):
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--no-cache")
    client_for(proc.endpoint, "client-key", "client-secret").put_object(Bucket="bkt", Key="k", Body=b"data")
    raw(proc.endpoint, "GET", "/bkt/k", {"Connection": "keep-alive, X-Secret", "Proxy-Authorization": "Basic x",
                                          "TE": "trailers", "X-Amz-Security-Token": "client-token"})
    put, get = upstream.seen
    assert put.method == "PUT" and put.body == b"data"
    for seen in (put, get):
        auth = seen.headers["Authorization"]
        # Signed by Sprox with the upstream credentials (testing/...), not the client's.
        assert "Credential=testing/" in auth and "client-key" not in auth
        lower = {k.lower() for k in seen.headers}
        assert not lower & {"proxy-authorization", "te", "x-amz-security-token", "x-secret"}
        assert seen.headers["Host"] == f"127.0.0.1:{upstream.port}"


def test_absolute_form_target_does_not_change_where_sprox_connects(start_sprox, tmp_path, upstream):
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--no-cache")
    status, _, _ = raw(proc.endpoint, "GET", "http://169.254.169.254:80/bkt/key", {"Host": "169.254.169.254"})
    assert status == 200
    assert [s.target for s in upstream.seen] == ["/bkt/key"]


def test_upstream_redirects_are_not_followed(start_sprox, tmp_path):
    with RecordingUpstream() as elsewhere, RecordingUpstream(redirect_to="") as upstream:
        upstream.redirect_to = f"{elsewhere.endpoint}/stolen"
        proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--no-cache")
        status, headers, _ = raw(proc.endpoint, "GET", "/bkt/key")
        assert status == 307 and elsewhere.seen == []


def test_query_and_key_are_forwarded_exactly(start_sprox, tmp_path, upstream):
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--no-cache")
    raw(proc.endpoint, "GET", "/bkt/a/../b%20c?response-content-type=text%2Fplain&X-Amz-Signature=zz")
    (seen,) = upstream.seen
    assert seen.target == "/bkt/a/%2E%2E/b%20c?response-content-type=text%2Fplain"


def test_connect_and_upgrade_requests_reach_nowhere(start_sprox, tmp_path, upstream):
    proc = start_sprox(tmp_path, "--upstream", upstream.endpoint, "--no-cache")
    status, _, body = raw(proc.endpoint, "CONNECT", "169.254.169.254:80", {"Host": "169.254.169.254:80"})
    assert status == 400 and b"<Code>InvalidRequest</Code>" in body
    status, _, body = raw(proc.endpoint, "GET", "/bkt/key", {"Connection": "Upgrade", "Upgrade": "websocket"})
    assert status == 400 and b"<Code>InvalidRequest</Code>" in body
    assert upstream.seen == []
    assert raw(proc.endpoint, "GET", "/bkt/key")[0] == 200  # and Sprox still serves
