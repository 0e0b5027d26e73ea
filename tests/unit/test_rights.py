"""What a key's rights allow, request by request (the functional side, with real
clients and cached bytes, is tests/functional/test_auth.py)."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sprox.config import AccessKey
from sprox.s3 import rights
from sprox.s3.errors import S3Error
from sprox.s3.request import parse_request

READER = AccessKey("r", "s", buckets=("data",), write=False)
LOGS = AccessKey("l", "s", buckets=("logs-*",), write=True)
EVERYTHING = AccessKey("a", "s")


def request(method: str, target: str, **headers: str):
    return parse_request(method, target, CIMultiDictProxy(CIMultiDict({"Host": "localhost", **headers})))


ALLOWED = [
    (READER, "GET", "/data/k", {}),
    (READER, "HEAD", "/data/k", {}),
    (READER, "GET", "/data?list-type=2", {}),
    (LOGS, "PUT", "/logs-1/k", {}),
    (LOGS, "PUT", "/logs-1/k", {"x-amz-copy-source": "/logs-2/k"}),
    (LOGS, "POST", "/logs-1?delete", {}),
    (EVERYTHING, "GET", "/", {}),
    (EVERYTHING, "PUT", "/new-bucket", {}),
]

DENIED = [
    (READER, "GET", "/other/k", {}),
    (READER, "PUT", "/data/k", {}),
    (READER, "DELETE", "/data/k", {}),
    (READER, "POST", "/data?delete", {}),
    (READER, "GET", "/", {}),  # ListBuckets would show every bucket
    (LOGS, "GET", "/logs/k", {}),  # "logs-*" does not match "logs"
    (LOGS, "PUT", "/logs-1/k", {"x-amz-copy-source": "/data/k"}),
    (LOGS, "PUT", "/logs-1/k", {"x-amz-copy-source": "data/k%3FversionId%3D1"}),
    (LOGS, "PUT", "/logs-1/k?partNumber=1&uploadId=u", {"x-amz-copy-source": "%2Fdata%2Fk"}),
]


@pytest.mark.parametrize("key,method,target,headers", ALLOWED)
def test_allowed(key, method, target, headers):
    rights.check(key, request(method, target, **headers))


@pytest.mark.parametrize("key,method,target,headers", DENIED)
def test_denied(key, method, target, headers):
    with pytest.raises(S3Error) as caught:
        rights.check(key, request(method, target, **headers))
    assert (caught.value.code, caught.value.status) == ("AccessDenied", 403)
