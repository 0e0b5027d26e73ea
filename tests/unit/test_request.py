"""Parsing an HTTP request into the S3 request model."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from sprox.s3.errors import S3Error
from sprox.s3.request import parse_request


def req(method, target, domain=None, **headers):
    h = CIMultiDictProxy(CIMultiDict({"Host": "127.0.0.1:9000", **headers}))
    return parse_request(method, target, h, domain=domain)


OPERATIONS = [
    ("GET", "/", "ListBuckets"),
    ("GET", "/bkt", "ListObjects"),
    ("GET", "/bkt/", "ListObjects"),
    ("GET", "/bkt?list-type=2&prefix=a", "ListObjectsV2"),
    ("GET", "/bkt/?list-type=2", "ListObjectsV2"),
    ("GET", "/bkt?location", "GetBucketLocation"),
    ("GET", "/bkt?uploads", "ListMultipartUploads"),
    ("GET", "/bkt?versioning", "GetBucketVersioning"),
    ("HEAD", "/bkt", "HeadBucket"),
    ("PUT", "/bkt", "CreateBucket"),
    ("DELETE", "/bkt", "DeleteBucket"),
    ("POST", "/bkt?delete", "DeleteObjects"),
    ("GET", "/bkt/k", "GetObject"),
    ("HEAD", "/bkt/k", "HeadObject"),
    ("PUT", "/bkt/k", "PutObject"),
    ("PUT", "/bkt/k?partNumber=1&uploadId=u", "UploadPart"),
    ("POST", "/bkt/k?uploads", "CreateMultipartUpload"),
    ("POST", "/bkt/k?uploadId=u", "CompleteMultipartUpload"),
    ("DELETE", "/bkt/k?uploadId=u", "AbortMultipartUpload"),
    ("GET", "/bkt/k?uploadId=u", "ListParts"),
    ("DELETE", "/bkt/k", "DeleteObject"),
    ("GET", "/bkt/k?tagging", "GetObjectTagging"),
]


@pytest.mark.parametrize("method,target,operation", OPERATIONS)
def test_operation_names(method, target, operation):
    assert req(method, target).operation == operation


def test_copy_operations_depend_on_copy_source_header():
    assert req("PUT", "/bkt/k", **{"x-amz-copy-source": "/a/b"}).operation == "CopyObject"
    assert req("PUT", "/bkt/k?partNumber=2&uploadId=u", **{"x-amz-copy-source": "/a/b"}).operation == "UploadPartCopy"


KEYS = [
    ("/bkt/a/../b", "a/../b"),
    ("/bkt/a//b", "a//b"),
    ("/bkt/a%252Fb", "a%2Fb"),
    ("/bkt/a%2Fb", "a/b"),
    ("/bkt/%E2%82%AC%20x+y", "€ x+y"),
    ("/bkt/dir/", "dir/"),
    ("/bkt/./x", "./x"),
]


@pytest.mark.parametrize("target,key", KEYS)
def test_keys_are_taken_verbatim_from_the_raw_target(target, key):
    r = req("GET", target)
    assert (r.bucket, r.key) == ("bkt", key)


def test_absolute_form_target_never_chooses_a_host():
    r = req("GET", "http://evil.example:80/bkt/key?x=1")
    assert (r.bucket, r.key, r.query.get("x")) == ("bkt", "key", "1")


def test_virtual_hosted_style():
    r = req("GET", "/dir/file.parquet", domain="s3.local", Host="data.s3.local:9000")
    assert (r.bucket, r.key, r.virtual_hosted) == ("data", "dir/file.parquet", True)
    r = req("GET", "/data/file", domain="s3.local", Host="s3.local:9000")
    assert (r.bucket, r.key, r.virtual_hosted) == ("data", "file", False)


def test_presign_parameters_are_not_sub_resources():
    r = req("GET", "/bkt/k?X-Amz-Signature=abc&X-Amz-Credential=x&versionId=3")
    assert list(r.query.keys()) == ["versionId"] and r.operation == "GetObject"


@pytest.mark.parametrize("target,code", [
    ("/bkt/%FF", "InvalidURI"),
    ("/a/key", "InvalidBucketName"),
    ("/Bad..Name/key", "InvalidBucketName"),
    ("/bkt/" + "k" * 1025, "KeyTooLongError"),
])
def test_bad_targets_get_s3_errors(target, code):
    with pytest.raises(S3Error) as info:
        req("GET", target)
    assert info.value.code == code and info.value.status == 400
