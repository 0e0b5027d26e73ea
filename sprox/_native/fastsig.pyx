"""SigV4 header signatures of the common request, checked in C with OpenSSL's libcrypto.

The pure-Python twin `sprox._native._fastsig_py` is the reference: it documents the
rules, and this module must give the same answer for every request (the tests compare
the two, and both against the full verifier, on random requests). Callers import
`sprox.fastsig`, which picks one of the two.

The canonical request is built with memcpy into a buffer of this object, hashed with
SHA-256 and signed with HMAC over a signing key kept per (secret, date, region) (the
helpers are in `_sigv4_c.pxi`, shared with the hit kernel):
no Python string is built for it. The headers still arrive as Python objects (the
lane's parse makes them); reading them costs a few lookups, not a canonical form.
"""

from libc.stdint cimport int64_t
from libc.string cimport memcpy

from sprox._native._fastsig_py import (
    ALGORITHM_PREFIX,
    CONTENT_SHA256,
    MAX_CANONICAL_BYTES,
    SCOPE_TAIL,
    fields_of,
)

__all__ = ["FastSigV4"]


include "_sigv4_c.pxi"

cdef extern from *:
    """
    /* Points *chars at the characters of the str `text` and returns 1 when all of
       them are ASCII (one byte each, nothing copied); 0 otherwise; -1 on error. */
    static int sprox_sig_ascii(PyObject *text, const char **chars, Py_ssize_t *length) {
    #if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(text) < 0) return -1;
    #endif
        if (!PyUnicode_IS_ASCII(text)) return 0;
        *chars = (const char *)PyUnicode_DATA(text);
        *length = PyUnicode_GET_LENGTH(text);
        return 1;
    }
    """
    int sprox_sig_ascii(object text, const char **chars, Py_ssize_t *length) except -1

DEF BUFFER_BYTES = 8192  # = MAX_CANONICAL_BYTES (checked at import, below)

cdef const char *AMZ_PREFIX = b"x-amz-"


cdef bint _unsigned_amz_headers(object headers, tuple signed) except -1:
    """The twin's unsigned_amz_headers: an x-amz-* header the signature does not cover.
    The prefix is compared in C; only such headers cost a lower() and a lookup."""
    cdef object name  # multidict's istr: a str subclass
    cdef const char *chars
    cdef Py_ssize_t n, i
    cdef bint amz
    for name in headers:
        if not isinstance(name, str):
            return True  # not a header set this module knows: decline
        if sprox_sig_ascii(name, &chars, &n):
            amz = n >= 6
            i = 0
            while amz and i < 6:
                amz = (chars[i] | 32 if c'A' <= chars[i] <= c'Z' else chars[i]) == AMZ_PREFIX[i]
                i += 1
            if not amz:
                continue
        elif name[:6].lower() != "x-amz-":
            continue
        lower = name.lower()
        if lower != CONTENT_SHA256 and lower not in signed:
            return True
    return False


cdef class FastSigV4:
    """`FastSigV4(keys, clock, max_skew_seconds)`; `verify(method, raw_path, raw_query,
    headers)` -> the access key, or None: not this module's case, or not a valid
    signature (the full verifier then decides, and words the error)."""

    cdef object _keys
    cdef object _clock
    cdef double _max_skew
    cdef dict _signing_keys
    cdef char _buffer[BUFFER_BYTES]

    def __cinit__(self, keys, clock, double max_skew_seconds):
        self._keys = keys
        self._clock = clock
        self._max_skew = max_skew_seconds
        self._signing_keys = {}

    cdef bint _append(self, Py_ssize_t *at, const char *data, Py_ssize_t n) noexcept:
        if at[0] + n > BUFFER_BYTES:
            return False
        memcpy(self._buffer + at[0], data, n)
        at[0] += n
        return True

    cdef bint _append_plain(self, Py_ssize_t *at, object value) except -1:
        """Append the twin's plain_value(value); False for what it refuses (non-ASCII,
        a tab, a run of spaces inside) or when the buffer is full."""
        cdef const char *chars
        cdef Py_ssize_t n, i, start = 0, end
        if not isinstance(value, str) or not sprox_sig_ascii(value, &chars, &n):
            return False
        for i in range(n):
            if chars[i] == c'\t':
                return False
        end = n
        while start < end and chars[start] == c' ':
            start += 1
        while end > start and chars[end - 1] == c' ':
            end -= 1
        for i in range(start, end - 1):
            if chars[i] == c' ' and chars[i + 1] == c' ':
                return False
        return self._append(at, chars + start, end - start)

    cdef bint _append_str(self, Py_ssize_t *at, str text) except -1:
        cdef const char *chars
        cdef Py_ssize_t n
        if not sprox_sig_ascii(text, &chars, &n):
            return False
        return self._append(at, chars, n)

    cdef bytes _signing_key(self, str secret, str date, str region):
        """The signing key's HMAC prefixes (a KeyedHmac, as bytes), derived once per
        (secret, date, region); None for a secret longer than this module handles."""
        cdef tuple cache_key = (secret, date, region)
        cdef object known = self._signing_keys.get(cache_key)
        if known is not None:
            return <bytes>known
        cdef unsigned char key[64]
        cdef unsigned char out[32]
        cdef bytes seed = ("AWS4" + secret).encode("utf-8")
        cdef bytes part
        cdef Py_ssize_t key_len = len(seed)
        if key_len > 64:
            return None  # an outlandish secret: the full verifier handles it
        memcpy(key, <const char *>seed, key_len)
        for part in (date.encode(), region.encode(), b"s3", b"aws4_request"):
            _hmac_once(key, key_len, <const char *>part, len(part), out)
            memcpy(key, out, 32)
            key_len = 32
        cdef KeyedHmac keyed
        _keyed_hmac(key, 32, &keyed)
        derived = (<char *>&keyed)[:sizeof(KeyedHmac)]
        if len(self._signing_keys) >= 256:  # bounded: a client picks the region
            del self._signing_keys[next(iter(self._signing_keys))]
        self._signing_keys[cache_key] = derived
        return derived

    def verify(self, str method, str raw_path, str raw_query, headers):
        if raw_query:
            return None  # queries (and so presigned URLs) take the full verifier
        authorizations = headers.getall("Authorization", ())
        if len(authorizations) != 1:
            return None
        fields = fields_of(authorizations[0])
        if fields is None:
            return None
        access_key, date, region, signed_names, signature = fields
        dates = headers.getall("x-amz-date", ())
        hashes = headers.getall(CONTENT_SHA256, ())
        if len(dates) != 1 or len(hashes) != 1:
            return None
        cdef str timestamp = dates[0]
        cdef const char *t
        cdef Py_ssize_t tn
        if not sprox_sig_ascii(timestamp, &t, &tn) or not _amz_date_shape(t, tn) or timestamp[:8] != date:
            return None
        cdef int64_t when = _amz_epoch(t)
        if when < 0 or abs(<double>when - <double>self._clock()) > self._max_skew:
            return None
        secret = self._keys.get(access_key)
        if secret is None or _unsigned_amz_headers(headers, signed_names):
            return None

        cdef Py_ssize_t at = 0
        cdef str name
        if not (self._append_str(&at, method) and self._append(&at, b"\n", 1)
                and self._append_str(&at, raw_path) and self._append(&at, b"\n\n", 2)):
            return None
        for name in signed_names:
            values = headers.getall(name, ())
            if len(values) != 1:
                return None
            if not (self._append_str(&at, name) and self._append(&at, b":", 1)
                    and self._append_plain(&at, values[0]) and self._append(&at, b"\n", 1)):
                return None
        if not (self._append(&at, b"\n", 1) and self._append_str(&at, ";".join(signed_names))
                and self._append(&at, b"\n", 1) and self._append_str(&at, hashes[0])):
            return None

        cdef unsigned char digest[32]
        cdef char hex_digest[64]
        cdef SHA256_CTX sha
        SHA256_Init(&sha)
        SHA256_Update(&sha, self._buffer, at)
        SHA256_Final(digest, &sha)
        _hex(digest, hex_digest)
        # The string to sign, in the same buffer (the canonical request is hashed).
        at = 0
        if not (self._append(&at, ALGORITHM_LINE, ALGORITHM_LINE_BYTES) and self._append_str(&at, timestamp)
                and self._append(&at, b"\n", 1) and self._append_str(&at, date)
                and self._append(&at, b"/", 1) and self._append_str(&at, region)
                and self._append(&at, SCOPE_END, SCOPE_END_BYTES) and self._append(&at, hex_digest, 64)):
            return None
        cdef bytes keyed = self._signing_key(secret, date, region)
        if keyed is None:
            return None
        cdef unsigned char mac[32]
        cdef char expected[64]
        _hmac(<const KeyedHmac *><const char *>keyed, self._buffer, at, mac)
        _hex(mac, expected)
        cdef const char *provided
        cdef Py_ssize_t provided_len
        if not sprox_sig_ascii(signature, &provided, &provided_len) or provided_len != 64:
            return None
        if CRYPTO_memcmp(expected, provided, 64) != 0:
            return None
        return access_key


if (MAX_CANONICAL_BYTES != BUFFER_BYTES or ALGORITHM_PREFIX != ALGORITHM_LINE[:ALGORITHM_LINE_BYTES]
        or SCOPE_TAIL != SCOPE_END[:SCOPE_END_BYTES]):  # pragma: no cover - a slip between the two
    raise ImportError("sprox._native.fastsig: its constants differ from its twin's")
