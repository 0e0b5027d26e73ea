# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The hit kernel: a cache hit answered from the bytes of its request head to the
`sendfile`, in C, with no Python object made on the way.

    data_received(bytes) -> HitKernel.serve(socket fd, bytes)
      scan      the head with a strict subset of HTTP/1.1 (anything else: declined)
      verify    SigV4 (Authorization header or presigned) or presigned SigV2, over
                the head's own bytes
      look up   the object in the mirror: a C hash table the cache keeps (install on a
                hit the Python lane planned, forget on any change to the key)
      plan      freshness, key rights, the range, block presence bits
      render    status line and headers into this kernel's buffer
      send      one send of head and body when the body is small (read with
                preadv2(RWF_NOWAIT)), else send and sendfile(2) from the block file
      log       a fixed-size record into a ring; drain() (every 25 ms) turns the
                records into the access log's Arrow columns in C and counts the
                blocks read for the eviction policy

Declining is always safe and always early: nothing is written to the socket and
nothing is changed before every check passed, and the caller then hands the same bytes
to llhttp and the Python lane, which decides everything again. So the kernel only
ever answers a request the Python lane would have answered the same way, and
everything unusual (other queries, header-signed SigV2, conditional requests,
virtual hosts without --domain, pipelined requests, other x-amz-* headers, a ring or
buffer that is full) simply takes the Python lane.

What the kernel relies on, kept by `sprox.cache.mirror.HitMirror` (Python, called on
fills, drops and revalidation, never per hit):
  - an entry is installed only after the Python lane planned a hit for that key, with
    the access key whose rights it checked (other keys decline until they are checked
    there too);
  - the entry is forgotten whenever the key's record is replaced, dropped or learns
    its checksums, and its freshness deadline is never later than the record's;
  - block presence is read from the record's own bitmaps (`present`, `unverified`),
    so evicting or filling a block is seen by the next hit without any call;
  - the entry holds its own reference to the block file's descriptor.
A send that the socket cannot take at once (PARTIAL) continues in Python, which pins
the blocks for it; everything the kernel sends synchronously needs no pin: eviction
runs on this same thread, between callbacks.

There is no pure-Python twin of this module: with SPROX_NO_EXTENSIONS=1 (or without a
compiler or libcrypto) the Python lane (`FrontEnd.try_hit`) answers every hit, with
the same bytes; the tests run both builds and compare.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.exc cimport PyErr_Clear
from cpython.list cimport PyList_GET_ITEM
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.errno cimport EAGAIN, EINTR, errno
from libc.math cimport llround
from libc.stdint cimport int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcmp, memcpy, memset
from posix.types cimport off_t

include "_sigv4_c.pxi"

__all__ = ["HitKernel", "DECLINED", "SENT", "SENT_CLOSE", "PARTIAL", "FAILED", "FAILED_FILE"]

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL

cdef extern from *:
    """
    #define OPENSSL_SUPPRESS_DEPRECATED 1
    #include <openssl/sha.h>
    """
    ctypedef struct SHA_CTX:
        pass
    int SHA1_Init(SHA_CTX *c) nogil
    int SHA1_Update(SHA_CTX *c, const void *data, size_t length) nogil
    int SHA1_Final(unsigned char *md, SHA_CTX *c) nogil

cdef extern from *:
    """
    #define sprox_bytearray_size(o) PyByteArray_GET_SIZE((PyObject *)(o))
    #define sprox_bytearray_data(o) PyByteArray_AS_STRING((PyObject *)(o))
    """
    # The record's bitmaps, read through the entry's borrowed pointers: no reference
    # counting on the hit path (the entry owns a reference to each).
    Py_ssize_t sprox_bytearray_size(PyObject *o) nogil
    char *sprox_bytearray_data(PyObject *o) nogil

cdef extern from "<string.h>" nogil:
    const void *memchr(const void *s, int c, size_t n)

cdef extern from "<sys/sendfile.h>" nogil:
    ssize_t sendfile(int out_fd, int in_fd, off_t *offset, size_t count)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    int RWF_NOWAIT

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    struct tm:
        int tm_sec
        int tm_min
        int tm_hour
        int tm_mday
        int tm_mon
        int tm_year
        int tm_wday
    int clock_gettime(int clock, timespec *ts)
    tm *gmtime_r(const time_t *t, tm *out)
    int CLOCK_REALTIME
    int CLOCK_MONOTONIC

# What serve() did (the lane acts on it).
DEF _DECLINED = 0
DEF _SENT = 1
DEF _SENT_CLOSE = 2
DEF _PARTIAL = 3
DEF _FAILED = 4
DEF _FAILED_FILE = 5
DECLINED = _DECLINED  # not answered; nothing written: hand the bytes to llhttp
SENT = _SENT  # answered in full
SENT_CLOSE = _SENT_CLOSE  # answered in full; the client asked to close
PARTIAL = _PARTIAL  # answered in part: take_pending() says what is left
FAILED = _FAILED  # the connection failed while answering: abort it
FAILED_FILE = _FAILED_FILE  # the block file ended early: abort, and say so

DEF MAX_HEAD = 8192  # a longer head takes the Python lane
DEF MAX_HEADERS = 48
DEF MAX_KEYS = 64  # access keys checked here; others take the Python lane
DEF MAX_ALLOWED = 8  # access keys remembered per entry as allowed to read it
DEF MAX_AGENTS = 32  # distinct User-Agent values remembered for the log
DEF MAX_AGENT_BYTES = 256
DEF MAX_RANGE_BYTES = 64
DEF RING_RECORDS = 16384
DEF TABLE_SLOTS = 4096  # hash buckets (entries chain); the mirror keeps fewer entries
DEF COPY_MAX = 65536  # without sendfile: bodies up to this are copied in one send
DEF OUT_BYTES = MAX_HEAD + 4096 + COPY_MAX
DEF CANONICAL_BYTES = 8192
DEF MAX_BUCKETS = 32  # latency histogram bounds (sprox.metrics.LATENCY_BUCKETS)
DEF COALESCE_MAX = 16384  # bodies up to this leave in one send with their head
DEF BLOCK_SLOTS_LOG2 = 12  # drain()'s table of blocks read: spilled when half full
DEF BLOCK_SLOTS = 1 << BLOCK_SLOTS_LOG2
DEF BLOCK_SLOTS_HALF = BLOCK_SLOTS >> 1

cdef const char *DAYS = b"SunMonTueWedThuFriSat"
cdef const char *HEX_UPPER = b"0123456789ABCDEF"
cdef const char *MONTHS = b"JanFebMarAprMayJunJulAugSepOctNovDec"


cdef struct Span:
    Py_ssize_t at
    Py_ssize_t n


cdef struct Head:
    # A request head as the strict scanner read it: offsets into the caller's bytes.
    int method  # 1 GET, 2 HEAD
    Span target
    int count
    Span names[MAX_HEADERS]
    Span values[MAX_HEADERS]  # without the surrounding spaces
    int host, authorization, amz_date, content_sha256, range_, checksum_mode, user_agent
    bint close
    bint content_headers  # Content-Type or Content-MD5 (a SigV2 signature covers them)


cdef struct Sha1Hmac:
    SHA_CTX inner
    SHA_CTX outer


cdef struct KeySlot:
    char access_key[128]
    int access_key_len
    unsigned char secret[64]  # "AWS4" + secret
    int secret_len
    # The last signing key derived (a client signs with one date and region for a day).
    char date[8]
    char region[64]
    int region_len
    bint keyed
    KeyedHmac hmac
    # SigV2 (presigned URLs): HMAC-SHA1 prefixes of the secret itself; has_v2 False for
    # a secret longer than one SHA-1 block.
    bint has_v2
    Sha1Hmac v2


cdef struct Entry:
    Entry *next
    uint64_t hash
    char *name  # "bucket/key", UTF-8
    Py_ssize_t name_len
    int64_t record_id
    int64_t size
    int64_t block_size
    int fd
    double fresh_until  # epoch seconds
    PyObject *present  # the record's bitmaps (bytearray, owned references)
    PyObject *unverified
    PyObject *bucket  # str, owned: for the access log
    PyObject *key
    char *template
    Py_ssize_t template_len
    char *template_ck  # with the checksum headers; NULL: not known
    Py_ssize_t template_ck_len
    int allowed[MAX_ALLOWED]
    int allowed_count


cdef struct LogRecord:
    double started_at
    double seconds
    int64_t bytes_sent
    int64_t first_byte  # -1 for a HEAD
    int64_t object_size
    int64_t record_id
    int64_t first_block
    int64_t last_block  # first_block - 1: no block (HEAD, empty)
    PyObject *bucket  # owned
    PyObject *key
    int status
    int method
    int key_slot  # -1: no access key (--auth none)
    int agent  # -1: no User-Agent
    char request_id[16]
    char range_[MAX_RANGE_BYTES]
    int range_len  # -1: no Range


cdef struct BlockCount:
    int64_t record_id
    int64_t block
    int64_t count  # 0: a free slot


cdef inline double _now(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef inline uint64_t _hash(const char *data, Py_ssize_t n) noexcept nogil:
    # FNV-1a, 64-bit: keys are short, and the table is ours alone.
    cdef uint64_t h = 1469598103934665603ULL
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ <unsigned char>data[i]) * 1099511628211ULL
    return h


cdef inline char _lower(char c) noexcept nogil:
    return c + 32 if c'A' <= c <= c'Z' else c


cdef inline bint _is_tchar(unsigned char c) noexcept nogil:
    # RFC 9110 token characters.
    if c'a' <= c <= c'z' or c'A' <= c <= c'Z' or c'0' <= c <= c'9':
        return True
    return c in b"!#$%&'*+-.^_`|~"


cdef inline bint _is_target_char(unsigned char c) noexcept nogil:
    # An origin-form target: unreserved, sub-delims, ':', '@', '/', '%', and '?'.
    if c'a' <= c <= c'z' or c'A' <= c <= c'Z' or c'0' <= c <= c'9':
        return True
    return c in b"-._~!$&'()*+,;=:@/%?"


cdef inline int _hex_value(char c) noexcept nogil:
    if c'0' <= c <= c'9':
        return c - c'0'
    if c'a' <= c <= c'f':
        return c - c'a' + 10
    if c'A' <= c <= c'F':
        return c - c'A' + 10
    return -1


cdef bint _name_is(const char *buf, Span name, const char *lower_name) noexcept nogil:
    """Whether the header name equals `lower_name` (given lower-case), ignoring case."""
    cdef Py_ssize_t i = 0
    while i < name.n:
        if lower_name[i] == 0 or _lower(buf[name.at + i]) != lower_name[i]:
            return False
        i += 1
    return lower_name[i] == 0


cdef bint _scan(const char *buf, Py_ssize_t n, Head *h) noexcept nogil:
    """Read `buf[:n]` as exactly one GET or HEAD request head in the strictest form
    (CRLF only, token header names, visible ASCII values, no obs-fold, nothing after
    the blank line). False for anything else: llhttp then frames it."""
    cdef Py_ssize_t at, v0, v1
    cdef int i
    cdef Span name
    memset(h, 0, sizeof(Head))
    h.host = h.authorization = h.amz_date = h.content_sha256 = h.range_ = -1
    h.checksum_mode = h.user_agent = -1
    if n >= 4 and memcmp(buf, b"GET ", 4) == 0:
        h.method = 1
        at = 4
    elif n >= 5 and memcmp(buf, b"HEAD ", 5) == 0:
        h.method = 2
        at = 5
    else:
        return False
    if at >= n or buf[at] != c'/':
        return False
    h.target.at = at
    while at < n and _is_target_char(buf[at]):
        at += 1
    h.target.n = at - h.target.at
    if at + 11 > n or memcmp(buf + at, b" HTTP/1.1\r\n", 11) != 0:
        return False
    at += 11
    while True:
        if at + 2 > n:
            return False
        if buf[at] == c'\r':
            # The blank line: it must end the bytes (a pipelined request: llhttp's).
            return buf[at + 1] == c'\n' and at + 2 == n
        if h.count == MAX_HEADERS:
            return False
        name.at = at
        while at < n and _is_tchar(buf[at]):
            at += 1
        name.n = at - name.at
        if name.n == 0 or at >= n or buf[at] != c':':
            return False  # (obs-fold starts with a space: no token, refused here)
        at += 1
        while at < n and buf[at] == c' ':
            at += 1
        v0 = at
        while at < n and (c' ' <= <unsigned char>buf[at] <= c'~'):
            at += 1
        if at + 1 >= n or buf[at] != c'\r' or buf[at + 1] != c'\n':
            return False  # a tab, a control character, obs-text, or a bare LF
        v1 = at
        while v1 > v0 and buf[v1 - 1] == c' ':
            v1 -= 1
        at += 2
        i = h.count
        h.names[i] = name
        h.values[i].at = v0
        h.values[i].n = v1 - v0
        h.count += 1


cdef bint _classify(const char *buf, Head *h) noexcept nogil:
    """Note the headers a hit needs; False for a header that takes the Python lane:
    framing, upgrades, conditions, cache control, x-amz-* headers other than the
    signature's and checksum mode, a needed header sent twice, a Connection value other
    than keep-alive or close."""
    cdef int i
    cdef Span name, value
    cdef int *slot
    for i in range(h.count):
        name = h.names[i]
        value = h.values[i]
        slot = NULL
        if _name_is(buf, name, b"host"):
            slot = &h.host
        elif _name_is(buf, name, b"authorization"):
            slot = &h.authorization
        elif _name_is(buf, name, b"range"):
            slot = &h.range_
        elif _name_is(buf, name, b"user-agent"):
            slot = &h.user_agent
        elif _name_is(buf, name, b"x-amz-date"):
            slot = &h.amz_date
        elif _name_is(buf, name, b"x-amz-content-sha256"):
            slot = &h.content_sha256
        elif _name_is(buf, name, b"x-amz-checksum-mode"):
            slot = &h.checksum_mode
        elif _name_is(buf, name, b"content-type") or _name_is(buf, name, b"content-md5"):
            h.content_headers = True
            continue
        elif _name_is(buf, name, b"connection"):
            if value.n == 5 and _same_lower(buf + value.at, b"close", 5):
                h.close = True
            elif not (value.n == 10 and _same_lower(buf + value.at, b"keep-alive", 10)):
                return False
            continue
        elif (_name_is(buf, name, b"content-length") or _name_is(buf, name, b"transfer-encoding")
              or _name_is(buf, name, b"expect") or _name_is(buf, name, b"upgrade")
              or _name_is(buf, name, b"cache-control") or _name_is(buf, name, b"pragma")):
            return False
        elif name.n >= 3 and _same_lower(buf + name.at, b"if-", 3):
            return False
        elif name.n >= 6 and _same_lower(buf + name.at, b"x-amz-", 6):
            return False
        if slot is not NULL:
            if slot[0] >= 0:
                return False
            slot[0] = i
    return True


cdef inline bint _same_lower(const char *data, const char *lower, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if _lower(data[i]) != lower[i]:
            return False
    return True


cdef Py_ssize_t _decode_path(const char *src, Py_ssize_t n, char *out) noexcept nogil:
    """Percent-decode a path into `out` (at least `n` bytes); -1 for a bad escape. The
    bytes are the key's UTF-8 only if they are valid UTF-8; if they are not, no entry
    matches (entries are made from Python strings), and the Python lane answers."""
    cdef Py_ssize_t i = 0, o = 0
    cdef int hi, lo
    while i < n:
        if src[i] == c'%':
            if i + 2 >= n:
                return -1
            hi = _hex_value(src[i + 1])
            lo = _hex_value(src[i + 2])
            if hi < 0 or lo < 0:
                return -1
            out[o] = <char>(hi * 16 + lo)
            i += 3
        else:
            out[o] = src[i]
            i += 1
        o += 1
    return o


cdef int64_t _digits(const char *s, Py_ssize_t n) noexcept nogil:
    """A run of 1 to 18 ASCII digits as a number; -1 otherwise."""
    cdef int64_t v = 0
    cdef Py_ssize_t i
    if n < 1 or n > 18:
        return -1
    for i in range(n):
        if not (c'0' <= s[i] <= c'9'):
            return -1
        v = v * 10 + (s[i] - c'0')
    return v


cdef int _range(const char *v, Py_ssize_t n, int64_t size, int64_t *first, int64_t *last) noexcept nogil:
    """The one range of `bytes=a-b`, `bytes=a-` or `bytes=-n` that selects bytes of the
    object: 1, with first and last set; 0 for any other Range (the Python lane decides
    what it means: ignored, 416, several ranges, spaces)."""
    cdef Py_ssize_t dash = -1, i
    cdef int64_t a, b
    if n < 8 or memcmp(v, b"bytes=", 6) != 0 or size <= 0:
        return 0
    for i in range(6, n):
        if v[i] == c'-':
            if dash >= 0:
                return 0
            dash = i
    if dash < 0:
        return 0
    if dash == 6:  # suffix
        b = _digits(v + 7, n - 7)
        if b <= 0:
            return 0
        first[0] = size - (b if b < size else size)
        last[0] = size - 1
        return 1
    a = _digits(v + 6, dash - 6)
    if a < 0 or a >= size:
        return 0
    if dash == n - 1:
        first[0] = a
        last[0] = size - 1
        return 1
    b = _digits(v + dash + 1, n - dash - 1)
    if b < a:
        return 0
    first[0] = a
    last[0] = b if b < size else size - 1
    return 1


cdef inline Py_ssize_t _put(char *out, Py_ssize_t at, const char *data, Py_ssize_t n) noexcept nogil:
    memcpy(out + at, data, n)
    return at + n


cdef Py_ssize_t _put_int(char *out, Py_ssize_t at, int64_t v) noexcept nogil:
    cdef char digits[24]
    cdef int k = 0
    if v == 0:
        out[at] = c'0'
        return at + 1
    while v > 0:
        digits[k] = <char>(c'0' + v % 10)
        v //= 10
        k += 1
    while k > 0:
        k -= 1
        out[at] = digits[k]
        at += 1
    return at


cdef void _sha1_hmac_key(const unsigned char *key, size_t key_len, Sha1Hmac *out) noexcept nogil:
    """HMAC-SHA1's two fixed prefixes for a key of at most 64 bytes."""
    cdef unsigned char pad[64]
    cdef size_t i
    for i in range(64):
        pad[i] = (key[i] if i < key_len else 0) ^ 0x36
    SHA1_Init(&out.inner)
    SHA1_Update(&out.inner, pad, 64)
    for i in range(64):
        pad[i] = (key[i] if i < key_len else 0) ^ 0x5c
    SHA1_Init(&out.outer)
    SHA1_Update(&out.outer, pad, 64)


cdef const char *BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


cdef void _base64_20(const unsigned char *d, char *out) noexcept nogil:
    """Base64 of 20 bytes: 28 characters, the last one '='."""
    cdef int i, o = 0
    cdef unsigned int v
    for i in range(0, 18, 3):
        v = (d[i] << 16) | (d[i + 1] << 8) | d[i + 2]
        out[o] = BASE64[(v >> 18) & 63]
        out[o + 1] = BASE64[(v >> 12) & 63]
        out[o + 2] = BASE64[(v >> 6) & 63]
        out[o + 3] = BASE64[v & 63]
        o += 4
    v = (d[18] << 16) | (d[19] << 8)
    out[24] = BASE64[(v >> 18) & 63]
    out[25] = BASE64[(v >> 12) & 63]
    out[26] = BASE64[(v >> 6) & 63]
    out[27] = c'='


cdef bint _has_param(const char *q, Py_ssize_t n, const char *prefix, Py_ssize_t k) noexcept nogil:
    """Whether a query has a parameter starting `prefix` (`name=`)."""
    cdef Py_ssize_t at = 0
    while at + k <= n:
        if memcmp(q + at, prefix, k) == 0:
            return True
        while at < n and q[at] != c'&':
            at += 1
        at += 1
    return False


cdef inline void _split_target(const char *buf, Span target, Span *path, Span *query) noexcept nogil:
    """The path and the query (after '?', perhaps empty) of a target."""
    cdef const char *mark = <const char *>memchr(buf + target.at, c'?', target.n)
    path[0] = target
    query.at = query.n = 0
    if mark is not NULL:
        path.n = mark - (buf + target.at)
        query.at = target.at + path.n + 1
        query.n = target.n - path.n - 1


cdef struct SigFields:
    # The parts of a SigV4 signature, pointing into the head (or the kernel's buffers).
    const char *access_key
    Py_ssize_t access_key_n
    const char *date  # YYYYMMDD
    const char *region
    Py_ssize_t region_n
    const char *signed  # "host;x-amz-date"
    Py_ssize_t signed_n
    const char *signature  # 64 lower-case hex
    const char *timestamp  # YYYYMMDDTHHMMSSZ
    int64_t expires  # presigned: seconds
    const char *canonical_query
    Py_ssize_t canonical_query_n
    const char *payload
    Py_ssize_t payload_n


DEF MAX_PRESIGN_SECONDS = 604800  # a week: S3's limit, as in sprox.s3.sigv4
cdef const char *_PRESIGN_NAMES[6]
_PRESIGN_NAMES[:] = [b"X-Amz-Algorithm", b"X-Amz-Credential", b"X-Amz-Date", b"X-Amz-Expires",
                     b"X-Amz-SignedHeaders", b"X-Amz-Signature"]
cdef Py_ssize_t _PRESIGN_LENGTHS[6]
_PRESIGN_LENGTHS[:] = [15, 16, 10, 13, 19, 15]


cdef inline int _presign_param(const char *name, Py_ssize_t n) noexcept nogil:
    cdef int i
    for i in range(6):
        if n == _PRESIGN_LENGTHS[i] and memcmp(name, _PRESIGN_NAMES[i], n) == 0:
            return i
    return -1


cdef inline bint _unreserved(char c) noexcept nogil:
    return c'a' <= c <= c'z' or c'A' <= c <= c'Z' or c'0' <= c <= c'9' or c == c'-' or c == c'_' \
        or c == c'.' or c == c'~'


cdef bint _canonical_component(const char *v, Py_ssize_t n) noexcept nogil:
    """Whether a raw query value is already in SigV4's canonical form: unreserved
    characters as themselves, every other byte as %XX with upper-case hex."""
    cdef Py_ssize_t i = 0
    cdef int hi, lo
    while i < n:
        if _unreserved(v[i]):
            i += 1
            continue
        if v[i] != c'%' or i + 2 >= n:
            return False
        hi = _hex_value(v[i + 1])
        lo = _hex_value(v[i + 2])
        if hi < 0 or lo < 0 or (c'a' <= v[i + 1] <= c'f') or (c'a' <= v[i + 2] <= c'f') \
                or _unreserved(<char>(hi * 16 + lo)):
            return False
        i += 3
    return True


cdef inline bint _lower_hex(const char *v, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if not (c'0' <= v[i] <= c'9' or c'a' <= v[i] <= c'f'):
            return False
    return True


cdef inline bint _access_key_char(char c) noexcept nogil:
    return c'a' <= c <= c'z' or c'A' <= c <= c'Z' or c'0' <= c <= c'9' or c == c'.' or c == c'_' \
        or c == c'~' or c == c'+' or c == c'-'


cdef bint _credential(const char *a, Py_ssize_t an, SigFields *f) noexcept nogil:
    """`AK/YYYYMMDD/region/s3/aws4_request` (the whole of `a`) into f."""
    cdef Py_ssize_t at = 0, i
    while at < an and _access_key_char(a[at]):
        at += 1
    if at == 0 or at + 10 > an or a[at] != c'/':
        return False
    f.access_key = a
    f.access_key_n = at
    at += 1
    for i in range(8):
        if not (c'0' <= a[at + i] <= c'9'):
            return False
    f.date = a + at
    at += 8
    if a[at] != c'/':
        return False
    at += 1
    f.region = a + at
    while at < an and (c'a' <= a[at] <= c'z' or c'0' <= a[at] <= c'9' or a[at] == c'-'):
        at += 1
    f.region_n = (a + at) - f.region
    if f.region_n == 0 or f.region_n > 64 or an - at != 16 or memcmp(a + at, b"/s3/aws4_request", 16) != 0:
        return False
    return True


cdef bint _signed_names(const char *v, Py_ssize_t n) noexcept nogil:
    """`a;b;c`: lower-case names of [a-z0-9-], none empty."""
    cdef Py_ssize_t i
    if n == 0 or v[0] == c';' or v[n - 1] == c';':
        return False
    for i in range(n):
        if v[i] == c';':
            if v[i - 1] == c';':
                return False
        elif not (c'a' <= v[i] <= c'z' or c'0' <= v[i] <= c'9' or v[i] == c'-'):
            return False
    return True


cdef bint _header_fields(const char *buf, Head *h, SigFields *f) noexcept nogil:
    """The Authorization header's fields, in the form SDKs send:
    `AWS4-HMAC-SHA256 Credential=AK/YYYYMMDD/region/s3/aws4_request, SignedHeaders=a;b,
    Signature=<64 hex>` (`,` or `, ` between them), with x-amz-date and
    x-amz-content-sha256 each sent once."""
    if h.authorization < 0 or h.amz_date < 0 or h.content_sha256 < 0:
        return False
    cdef const char *a = buf + h.values[h.authorization].at
    cdef Py_ssize_t an = h.values[h.authorization].n, at, start
    if an < 28 or memcmp(a, b"AWS4-HMAC-SHA256 Credential=", 28) != 0:
        return False
    at = 28
    start = at
    while at < an and a[at] != c',':
        at += 1
    if at >= an or not _credential(a + start, at - start, f):
        return False
    at += 1
    if at < an and a[at] == c' ':
        at += 1
    if at + 14 > an or memcmp(a + at, b"SignedHeaders=", 14) != 0:
        return False
    at += 14
    start = at
    while at < an and a[at] != c',':
        at += 1
    if at >= an or not _signed_names(a + start, at - start):
        return False
    f.signed = a + start
    f.signed_n = at - start
    at += 1
    if at < an and a[at] == c' ':
        at += 1
    if at + 10 + 64 != an or memcmp(a + at, b"Signature=", 10) != 0 or not _lower_hex(a + at + 10, 64):
        return False
    f.signature = a + at + 10
    cdef const char *t = buf + h.values[h.amz_date].at
    if not _amz_date_shape(t, h.values[h.amz_date].n) or memcmp(t, f.date, 8) != 0:
        return False
    f.timestamp = t
    f.canonical_query = b""
    f.canonical_query_n = 0
    f.payload = buf + h.values[h.content_sha256].at
    f.payload_n = h.values[h.content_sha256].n
    return True


cdef class HitKernel:
    """`HitKernel(keys, max_skew_seconds, domain, request_id_prefix)`: `keys` maps
    access key ids to secrets (None: --auth none); `domain` is --domain (None: none).
    The mirror's entries are kept by `sprox.cache.mirror.HitMirror`."""

    cdef bint _auth
    cdef double _max_skew
    cdef bytes _domain  # lower-case, b"" for none
    cdef bint _has_domain
    cdef KeySlot *_keys
    cdef int _key_count
    cdef list _key_names  # access key ids (str) by slot, for the log
    cdef Entry **_table
    cdef Py_ssize_t _entries
    cdef LogRecord *_ring
    cdef uint64_t _ring_head  # records written
    cdef uint64_t _ring_tail  # records drained
    cdef char _agents[MAX_AGENTS][MAX_AGENT_BYTES]
    cdef int _agent_lengths[MAX_AGENTS]
    cdef int _agent_count
    cdef list _agent_names
    cdef char _id_prefix[8]
    cdef uint32_t _id_counter
    cdef time_t _date_second
    cdef char _date_line[64]  # "Date: ...\r\n"
    cdef Py_ssize_t _date_len
    cdef Head _head
    cdef char _name[MAX_HEAD]
    cdef char _out[OUT_BYTES]
    cdef char _canonical[CANONICAL_BYTES]
    cdef char _fields[2560]  # a presigned URL's decoded credential, signed headers, canonical query
    # What a PARTIAL answer left to send.
    cdef Py_ssize_t _pending_head_at
    cdef Py_ssize_t _pending_head_end
    cdef int64_t _pending_offset
    cdef int64_t _pending_remaining
    cdef int64_t _pending_length  # the whole body's
    cdef bint _pending_close  # the client asked to close after this answer
    cdef LogRecord _pending_log
    cdef bint _has_pending
    cdef dict _pending_states  # token -> the LogRecord of an answer the Python lane finishes
    cdef uint64_t _pending_token
    # Counters (read by the metrics).
    cdef public uint64_t hits
    cdef public uint64_t bytes_sent
    cdef public uint64_t ring_full  # hits given to the Python lane because the ring was full
    cdef public uint64_t partials  # answers the socket could not take at once (finished in Python)
    # The metrics of the hits logged since take_counters(): requests by method (GET,
    # HEAD), body bytes, and GETs' latency in the histogram's buckets.
    cdef uint64_t _requests[2]
    cdef uint64_t _sent
    cdef double _bounds[MAX_BUCKETS]
    cdef int _bound_count
    cdef uint64_t _latency_counts[MAX_BUCKETS + 1]
    cdef double _latency_sum
    # drain()'s count of reads per cached block (open addressing), and its output.
    cdef BlockCount *_block_counts
    cdef uint32_t _block_slots[BLOCK_SLOTS_HALF]  # the slots in use
    cdef Py_ssize_t _block_used
    cdef list _block_spill

    def __cinit__(self, keys, double max_skew_seconds, domain, str request_id_prefix, latency_buckets=()):
        self._table = <Entry **>calloc(TABLE_SLOTS, sizeof(Entry *))
        self._ring = <LogRecord *>calloc(RING_RECORDS, sizeof(LogRecord))
        self._keys = <KeySlot *>calloc(MAX_KEYS, sizeof(KeySlot))
        self._block_counts = <BlockCount *>calloc(BLOCK_SLOTS, sizeof(BlockCount))
        if self._table is NULL or self._ring is NULL or self._keys is NULL or self._block_counts is NULL:
            raise MemoryError()
        self._block_spill = []
        self._auth = keys is not None
        if len(latency_buckets) > MAX_BUCKETS:
            raise ValueError(f"at most {MAX_BUCKETS} latency buckets")
        for i, bound in enumerate(latency_buckets):
            self._bounds[i] = bound
        self._bound_count = len(latency_buckets)
        self._max_skew = max_skew_seconds
        self._domain = (domain or "").lower().encode("ascii")
        self._has_domain = len(self._domain) > 0
        self._key_names = []
        self._agent_names = []
        self._pending_states = {}
        cdef bytes prefix = request_id_prefix.encode("ascii")
        if len(prefix) != 8:
            raise ValueError("request_id_prefix: 8 characters")
        memcpy(self._id_prefix, <const char *>prefix, 8)
        import secrets
        self._id_counter = secrets.randbelow(1 << 32)
        cdef KeySlot *slot
        cdef bytes ak, seed
        for access_key, secret in (keys or {}).items():
            if self._key_count == MAX_KEYS:
                break
            ak = access_key.encode("utf-8")
            seed = ("AWS4" + secret).encode("utf-8")
            if len(ak) > 128 or len(seed) > 64:
                continue  # the Python lane checks this key's requests
            slot = &self._keys[self._key_count]
            memcpy(slot.access_key, <const char *>ak, len(ak))
            slot.access_key_len = len(ak)
            memcpy(slot.secret, <const char *>seed, len(seed))
            slot.secret_len = len(seed)
            if len(seed) - 4 <= 64:
                _sha1_hmac_key(<const unsigned char *>seed + 4, len(seed) - 4, &slot.v2)
                slot.has_v2 = True
            self._key_names.append(access_key)
            self._key_count += 1

    def __dealloc__(self):
        cdef Py_ssize_t i
        cdef Entry *e
        cdef Entry *nxt
        if self._table is not NULL:
            for i in range(TABLE_SLOTS):
                e = self._table[i]
                while e is not NULL:
                    nxt = e.next
                    _free_entry(e)
                    e = nxt
            free(self._table)
        if self._ring is not NULL:
            while self._ring_tail < self._ring_head:
                _release_log(&self._ring[self._ring_tail % RING_RECORDS])
                self._ring_tail += 1
            free(self._ring)
        if self._has_pending:
            _release_log(&self._pending_log)
        cdef LogRecord r
        if self._pending_states:
            for state in self._pending_states.values():
                memcpy(&r, PyBytes_AS_STRING(state), sizeof(LogRecord))
                _release_log(&r)
        free(self._keys)
        free(self._block_counts)

    # -- the mirror (kept by sprox.cache.mirror) --------------------------------------------

    def key_slot(self, access_key):
        """The slot of an access key id checked here, or -1."""
        try:
            return self._key_names.index(access_key)
        except ValueError:
            return -1

    def install(self, str bucket, str key, record, int fd, double fresh_until, bytes template,
                template_ck, int key_slot):
        """Mirror `record` (an ObjectRecord) for `bucket`/`key`, replacing any entry; the
        access key in `key_slot` (-1: none) may read it. `fd` stays open until forget."""
        cdef bytes name = (bucket + "/" + key).encode("utf-8")
        cdef Entry *e = self._find(<const char *>name, len(name), _hash(<const char *>name, len(name)))
        if e is not NULL and e.record_id == record.id:
            # The same record: refresh what may have changed, keep its allowed keys.
            e.fresh_until = fresh_until
            _allow(e, key_slot)
            return False
        self.forget(bucket, key)
        e = <Entry *>calloc(1, sizeof(Entry))
        if e is NULL:
            raise MemoryError()
        e.name_len = len(name)
        e.name = <char *>malloc(e.name_len)
        e.template_len = len(template)
        e.template = <char *>malloc(e.template_len)
        if template_ck is not None:
            e.template_ck_len = len(template_ck)
            e.template_ck = <char *>malloc(e.template_ck_len)
        if e.name is NULL or e.template is NULL or (template_ck is not None and e.template_ck is NULL):
            _free_entry(e)
            raise MemoryError()
        memcpy(e.name, <const char *>name, e.name_len)
        memcpy(e.template, <const char *>template, e.template_len)
        if template_ck is not None:
            memcpy(e.template_ck, <const char *>template_ck, e.template_ck_len)
        e.hash = _hash(e.name, e.name_len)
        e.record_id = record.id
        e.size = record.size
        e.block_size = record.block_size
        e.fd = fd
        e.fresh_until = fresh_until
        present, unverified = record.present, record.unverified
        if not isinstance(present, bytearray) or not isinstance(unverified, bytearray):
            _free_entry(e)
            raise TypeError("record bitmaps must be bytearrays")
        e.present = <PyObject *>present
        Py_INCREF(present)
        e.unverified = <PyObject *>unverified
        Py_INCREF(unverified)
        e.bucket = <PyObject *>bucket
        Py_INCREF(bucket)
        e.key = <PyObject *>key
        Py_INCREF(key)
        _allow(e, key_slot)
        cdef Py_ssize_t slot = e.hash % TABLE_SLOTS
        e.next = self._table[slot]
        self._table[slot] = e
        self._entries += 1
        return True

    def forget(self, str bucket, str key):
        """Drop the entry for `bucket`/`key`; True if there was one."""
        cdef bytes name = (bucket + "/" + key).encode("utf-8")
        cdef uint64_t h = _hash(<const char *>name, len(name))
        cdef Entry **link = &self._table[h % TABLE_SLOTS]
        cdef Entry *e = link[0]
        while e is not NULL:
            if e.hash == h and e.name_len == len(name) and memcmp(e.name, <const char *>name, e.name_len) == 0:
                link[0] = e.next
                _free_entry(e)
                self._entries -= 1
                return True
            link = &e.next
            e = e.next
        return False

    @property
    def entries(self):
        return self._entries

    cdef Entry *_find(self, const char *name, Py_ssize_t n, uint64_t h) noexcept nogil:
        cdef Entry *e = self._table[h % TABLE_SLOTS]
        while e is not NULL:
            if e.hash == h and e.name_len == n and memcmp(e.name, name, n) == 0:
                return e
            e = e.next
        return NULL

    # -- the access-log ring ------------------------------------------------------------------

    @property
    def ring_waiting(self):
        return self._ring_head - self._ring_tail

    def drain(self, Py_ssize_t limit=-1):
        """The hits logged since the last drain, oldest first, at most `limit` of them
        (all if negative): (log, blocks).

        `log` is the records as columns, made in C with no Python object per record:
        (count, then one bytes buffer or group of buffers per column of
        sprox.analytics.accesslog.SCHEMA, laid out as Arrow lays them out;
        `accesslog.kernel_batch` makes the RecordBatch). `blocks` is the cached blocks
        the GETs read and how often: (record id, block, times read), counted in a C
        table; a block may come in more than one entry when the table filled up."""
        cdef Py_ssize_t n = self._ring_head - self._ring_tail
        cdef Py_ssize_t i
        cdef LogRecord *r
        if 0 <= limit < n:
            n = limit
        cdef Py_ssize_t op_bytes = 0, bucket_bytes = 0, key_bytes = 0, range_bytes = 0
        cdef Py_ssize_t agent_bytes = 0, akey_bytes = 0
        cdef Py_ssize_t size
        cdef const char *text
        # Pass 1: the size of each string column's data.
        for i in range(n):
            r = &self._ring[(self._ring_tail + i) % RING_RECORDS]
            op_bytes += 9 if r.method == 1 else 10
            bucket_bytes += _utf8_size(r.bucket)
            key_bytes += _utf8_size(r.key)
            if r.range_len > 0:
                range_bytes += r.range_len
            if r.agent >= 0:
                agent_bytes += _utf8_size(PyList_GET_ITEM(self._agent_names, r.agent))
            if r.key_slot >= 0:
                akey_bytes += _utf8_size(PyList_GET_ITEM(self._key_names, r.key_slot))
        cdef _Columns c = _Columns(n, op_bytes, bucket_bytes, key_bytes, range_bytes, agent_bytes, akey_bytes)
        # (upstream_requests and upstream_bytes stay zero: a hit asks the upstream nothing.)
        # Pass 2: fill them.
        for i in range(n):
            r = &self._ring[self._ring_tail % RING_RECORDS]
            c.time_us[i] = llround(r.started_at * 1e6)
            memcpy(c.request_id + 16 * i, r.request_id, 16)
            c.request_id_offsets[i + 1] = <int32_t>(16 * (i + 1))
            if r.method == 1:
                _column_put(&c.operation, i, "GetObject", 9)
            else:
                _column_put(&c.operation, i, "HeadObject", 10)
            text = _utf8(r.bucket, &size)
            _column_put(&c.bucket, i, text, size)
            text = _utf8(r.key, &size)
            _column_put(&c.key, i, text, size)
            if r.range_len >= 0:
                _column_put(&c.range_, i, r.range_, r.range_len)
            else:
                _column_null(&c.range_, i)
            c.status[i] = <int16_t>r.status
            c.bytes_sent[i] = r.bytes_sent
            _column_put(&c.cache, i, "HIT", 3)
            c.latency_ms[i] = r.seconds * 1000.0
            if r.agent >= 0:
                text = _utf8(PyList_GET_ITEM(self._agent_names, r.agent), &size)
                _column_put(&c.user_agent, i, text, size)
            else:
                _column_null(&c.user_agent, i)
            if r.key_slot >= 0:
                text = _utf8(PyList_GET_ITEM(self._key_names, r.key_slot), &size)
                _column_put(&c.access_key, i, text, size)
            else:
                _column_null(&c.access_key, i)
            if r.first_byte >= 0:
                c.first_byte[i] = r.first_byte
                c.first_byte_valid[i >> 3] |= <uint8_t>(1 << (i & 7))
            c.object_size[i] = r.object_size
            if r.last_block >= r.first_block:
                self._count_blocks(r.record_id, r.first_block, r.last_block)
            _release_log(r)
            self._ring_tail += 1
        return c.as_tuple(), self._take_block_counts()

    cdef int _count_blocks(self, int64_t record_id, int64_t first, int64_t last) except -1:
        """Add one read of blocks first..last of a record to the drain's block counts."""
        cdef int64_t b
        cdef uint64_t slot
        cdef BlockCount *e
        for b in range(first, last + 1):
            if self._block_used * 2 >= BLOCK_SLOTS:
                self._spill_block_counts()
            slot = (<uint64_t>record_id * 0x9E3779B97F4A7C15ULL ^ <uint64_t>b * 0xC2B2AE3D27D4EB4FULL) \
                >> (64 - BLOCK_SLOTS_LOG2)
            while True:
                e = &self._block_counts[slot]
                if e.count == 0:
                    e.record_id = record_id
                    e.block = b
                    e.count = 1
                    self._block_slots[self._block_used] = <uint32_t>slot
                    self._block_used += 1
                    break
                if e.record_id == record_id and e.block == b:
                    e.count += 1
                    break
                slot = (slot + 1) & (BLOCK_SLOTS - 1)
        return 0

    cdef int _spill_block_counts(self) except -1:
        """Move the counts out of the table (half full, or at the drain's end) into
        the drain's list."""
        cdef Py_ssize_t i
        cdef BlockCount *e
        for i in range(self._block_used):
            e = &self._block_counts[self._block_slots[i]]
            self._block_spill.append((e.record_id, e.block, e.count))
            e.count = 0
        self._block_used = 0
        return 0

    cdef list _take_block_counts(self):
        self._spill_block_counts()
        cdef list out = self._block_spill
        self._block_spill = []
        return out

    def take_counters(self):
        """The metrics of the hits logged since the last call, and reset: (GET count,
        HEAD count, body bytes, GET latency counts per bucket (one more than the
        bounds: above them all), GET latency sum in seconds)."""
        out = (self._requests[0], self._requests[1], self._sent,
               [self._latency_counts[i] for i in range(self._bound_count + 1)], self._latency_sum)
        self._requests[0] = self._requests[1] = 0
        self._sent = 0
        memset(self._latency_counts, 0, sizeof(self._latency_counts))
        self._latency_sum = 0.0
        return out

    cdef void _count(self, LogRecord *r) noexcept nogil:
        """Add a logged hit to the metrics (the histogram: bisect_left over the bounds)."""
        cdef int i = 0
        self._requests[r.method - 1] += 1
        self._sent += r.bytes_sent
        if r.method == 1:
            while i < self._bound_count and self._bounds[i] < r.seconds:
                i += 1
            self._latency_counts[i] += 1
            self._latency_sum += r.seconds

    # -- a PARTIAL answer, continued by the Python lane -------------------------------------

    def take_pending(self):
        """What is left of the last PARTIAL answer: (bytes of the rendered answer not
        yet sent, record id, file offset, file bytes left, first block, last block, a
        token, the body's length, whether the client asked to close after it). The
        Python lane pins the blocks, sends the rest and calls `log_pending(token, body
        bytes sent)`, or `drop_pending(token)`."""
        if not self._has_pending:
            raise RuntimeError("no partial answer")
        self._has_pending = False
        # The record (with its bucket and key references) waits here, under a token:
        # Python never holds the pointers, and a token is used at most once.
        self._pending_token += 1
        self._pending_states[self._pending_token] = PyBytes_FromStringAndSize(
            <char *>&self._pending_log, sizeof(LogRecord))
        return (self._out[self._pending_head_at:self._pending_head_end], self._pending_log.record_id,
                self._pending_offset, self._pending_remaining, self._pending_log.first_block,
                self._pending_log.last_block, self._pending_token, self._pending_length, self._pending_close)

    def drop_pending(self, token):
        """Forget a continued answer without logging it."""
        cdef LogRecord r
        state = self._pending_states.pop(token, None)
        if state is not None:
            memcpy(&r, PyBytes_AS_STRING(state), sizeof(LogRecord))
            _release_log(&r)

    def log_pending(self, token, int64_t total_sent):
        """Log a continued answer, `total_sent` body bytes in all; False if the token
        was used already (or never given)."""
        cdef LogRecord r
        state = self._pending_states.pop(token, None)
        if state is None:
            return False
        memcpy(&r, PyBytes_AS_STRING(state), sizeof(LogRecord))
        r.bytes_sent = total_sent
        r.seconds = _now(CLOCK_MONOTONIC) - r.seconds  # (seconds held the start)
        self.bytes_sent += total_sent
        self._count(&r)
        if self._ring_head - self._ring_tail >= RING_RECORDS:
            self.ring_full += 1  # counted; the record's references are given back
            _release_log(&r)
            return False
        self._ring[self._ring_head % RING_RECORDS] = r
        self._ring_head += 1
        return True

    # -- serving ---------------------------------------------------------------------------

    def scan(self, bytes data not None):
        """For tests: (method, target, [(name, value), ...]) as the strict scanner read
        `data`, or None where it hands the head to llhttp."""
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef Head h
        if not _scan(buf, PyBytes_GET_SIZE(data), &h):
            return None
        return (b"GET" if h.method == 1 else b"HEAD", buf[h.target.at:h.target.at + h.target.n],
                [(buf[h.names[i].at:h.names[i].at + h.names[i].n],
                  buf[h.values[i].at:h.values[i].at + h.values[i].n]) for i in range(h.count)])

    def check_signature(self, bytes data not None, double now):
        """For tests: the access key id whose signature the head in `data` carries, as
        serve() checks it at time `now`; None where serve() declines."""
        cdef Head h
        if not _scan(PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &h) \
                or not _classify(PyBytes_AS_STRING(data), &h):
            return None
        cdef Span path, query
        cdef const char *buf = PyBytes_AS_STRING(data)
        _split_target(buf, h.target, &path, &query)
        slot = self._verify(buf, &h, path, query, now)
        return self._key_names[slot] if slot >= 0 else None

    @staticmethod
    def resolve_range(bytes value not None, int64_t size):
        """For tests: (first, last) of a Range value as serve() reads it, or None where
        it leaves the header to the Python lane."""
        cdef int64_t first = 0, last = 0
        if not _range(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value), size, &first, &last):
            return None
        return first, last

    cpdef int serve(self, int sock_fd, bytes data, bint use_sendfile) except -1:
        """Answer the request in `data` (the whole of what the socket gave, with nothing
        before it pending) if it is a hit; see the module docstring."""
        if data is None:
            raise TypeError("data must be bytes, not None")
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Head *h = &self._head
        cdef double started_at, started
        cdef int key_slot = -1
        cdef Entry *e
        if n > MAX_HEAD or self._ring_head - self._ring_tail >= RING_RECORDS:
            if n <= MAX_HEAD:
                self.ring_full += 1
            return _DECLINED
        if not _scan(buf, n, h) or not _classify(buf, h):
            return _DECLINED
        started = _now(CLOCK_MONOTONIC)
        started_at = _now(CLOCK_REALTIME)
        cdef Span path, query
        _split_target(buf, h.target, &path, &query)
        if query.n and not self._auth:
            return _DECLINED  # (a query under --auth none is some other operation)
        # bucket/key, as the Python lane derives them: decode the path, then split.
        cdef Py_ssize_t name_len = _decode_path(buf + path.at, path.n, self._name)
        if name_len < 4 or self._name[0] != c'/':
            return _DECLINED
        cdef const char *name = self._name + 1
        name_len -= 1
        cdef const char *slash = <const char *>memchr(name, c'/', name_len)
        if slash is NULL or slash == name or slash == name + name_len - 1:
            return _DECLINED  # a bucket (or no key): not an object read
        if self._has_domain and self._virtual_host(buf, h):
            return _DECLINED
        if self._auth:
            key_slot = self._verify(buf, h, path, query, started_at)
            if key_slot < 0:
                return _DECLINED
        e = self._find(name, name_len, _hash(name, name_len))
        if e is NULL or started_at > e.fresh_until:
            return _DECLINED
        if self._auth and not _allowed(e, key_slot):
            return _DECLINED
        return self._answer(sock_fd, buf, h, e, key_slot, use_sendfile, started_at, started)

    cdef bint _virtual_host(self, const char *buf, Head *h) noexcept:
        """Whether Host may name a bucket under --domain (the bucket is then not in the
        path): as parse_request reads it, or any host it reads otherwise (an IPv6
        literal, several colons), so that the kernel declines those."""
        cdef Py_ssize_t dn = len(self._domain), hn, i, colons = 0, colon = -1
        cdef const char *domain = self._domain
        if h.host < 0:
            return False
        cdef const char *host = buf + h.values[h.host].at
        hn = h.values[h.host].n
        if hn and host[0] == c'[':
            return True
        for i in range(hn):
            if host[i] == c':':
                colons += 1
                colon = i
        if colons > 1:
            return True
        if colons == 1:
            hn = colon  # without the port
        if hn < dn + 1 or host[hn - dn - 1] != c'.':
            return False
        return _same_lower(host + hn - dn, domain, dn)

    cdef int _verify(self, const char *buf, Head *h, Span path, Span query, double now) except -2:
        """The slot of the access key whose SigV4 signature this request carries (in its
        Authorization header, or presigned in its query), or -1: not the common form,
        or not valid (the full verifier then decides, and words the error)."""
        cdef SigFields f
        cdef int64_t when
        memset(&f, 0, sizeof(SigFields))
        if query.n >= 15 and _has_param(buf + query.at, query.n, b"AWSAccessKeyId=", 15):
            return self._verify_v2(buf, h, path, query, now)
        if query.n == 0:
            if not _header_fields(buf, h, &f):
                return -1
            when = _amz_epoch(f.timestamp)
            if when < 0 or abs(<double>when - now) > self._max_skew:
                return -1
        else:
            if h.authorization >= 0 or not self._query_fields(buf, h, query, &f):
                return -1
            when = _amz_epoch(f.timestamp)
            if when < 0 or now < <double>when - self._max_skew or now > <double>(when + f.expires):
                return -1
        cdef int slot = -1, k
        for k in range(self._key_count):
            if self._keys[k].access_key_len == f.access_key_n \
                    and memcmp(self._keys[k].access_key, f.access_key, f.access_key_n) == 0:
                slot = k
                break
        if slot < 0:
            return -1

        # The canonical request: every signed header sent once, `host` among them; every
        # x-amz-* header sent is signed (x-amz-content-sha256 may be unsigned).
        cdef char *c = self._canonical
        cdef Py_ssize_t o, i, name_start, name_n
        cdef int found, j, found_index
        cdef bint has_host = False, date_signed = False, checksum_mode_signed = False
        if path.n + query.n + 8 > CANONICAL_BYTES:
            return -1
        o = _put(c, 0, b"GET\n" if h.method == 1 else b"HEAD\n", 4 if h.method == 1 else 5)
        o = _put(c, o, buf + path.at, path.n)
        c[o] = c'\n'
        o = _put(c, o + 1, f.canonical_query, f.canonical_query_n)
        c[o] = c'\n'
        o += 1
        i = 0
        while i < f.signed_n:
            name_start = i
            while i < f.signed_n and f.signed[i] != c';':
                i += 1
            name_n = i - name_start
            i += 1
            if name_n == 4 and memcmp(f.signed + name_start, b"host", 4) == 0:
                has_host = True
            elif name_n == 10 and memcmp(f.signed + name_start, b"x-amz-date", 10) == 0:
                date_signed = True
            elif name_n == 19 and memcmp(f.signed + name_start, b"x-amz-checksum-mode", 19) == 0:
                checksum_mode_signed = True
            found = 0
            found_index = -1
            for j in range(h.count):
                if h.names[j].n == name_n and _same_lower(buf + h.names[j].at, f.signed + name_start, name_n):
                    found += 1
                    found_index = j
            if found != 1:
                return -1
            if not _plain(buf + h.values[found_index].at, h.values[found_index].n):
                return -1
            if o + name_n + h.values[found_index].n + 2 > CANONICAL_BYTES:
                return -1
            o = _put(c, o, f.signed + name_start, name_n)
            c[o] = c':'
            o = _put(c, o + 1, buf + h.values[found_index].at, h.values[found_index].n)
            c[o] = c'\n'
            o += 1
        if not has_host:
            return -1
        # The x-amz-* headers sent, other than x-amz-content-sha256 (only x-amz-date and
        # x-amz-checksum-mode get this far): each must be among the signed ones (a name
        # signed twice counts once).
        if (h.amz_date >= 0 and not date_signed) or (h.checksum_mode >= 0 and not checksum_mode_signed):
            return -1
        if o + 1 + f.signed_n + 1 + f.payload_n > CANONICAL_BYTES:
            return -1
        c[o] = c'\n'
        o = _put(c, o + 1, f.signed, f.signed_n)
        c[o] = c'\n'
        o = _put(c, o + 1, f.payload, f.payload_n)

        cdef unsigned char digest[32]
        cdef char hex_digest[64]
        cdef SHA256_CTX sha
        SHA256_Init(&sha)
        SHA256_Update(&sha, c, o)
        SHA256_Final(digest, &sha)
        _hex(digest, hex_digest)
        # The string to sign, in the same buffer.
        o = _put(c, 0, ALGORITHM_LINE, ALGORITHM_LINE_BYTES)
        o = _put(c, o, f.timestamp, 16)
        c[o] = c'\n'
        o = _put(c, o + 1, f.date, 8)
        c[o] = c'/'
        o = _put(c, o + 1, f.region, f.region_n)
        o = _put(c, o, SCOPE_END, SCOPE_END_BYTES)
        o = _put(c, o, hex_digest, 64)
        cdef KeySlot *key = &self._keys[slot]
        if not key.keyed or memcmp(key.date, f.date, 8) != 0 or key.region_len != f.region_n \
                or memcmp(key.region, f.region, f.region_n) != 0:
            _derive(key, f.date, f.region, f.region_n)
        cdef unsigned char mac[32]
        cdef char expected[64]
        _hmac(&key.hmac, c, o, mac)
        _hex(mac, expected)
        if CRYPTO_memcmp(expected, f.signature, 64) != 0:
            return -1
        return slot

    cdef int _verify_v2(self, const char *buf, Head *h, Span path, Span query, double now) except -2:
        """A SigV2 presigned URL (what boto3's generate_presigned_url makes by default):
        exactly AWSAccessKeyId, Signature and Expires in the query, no x-amz-*,
        Content-Type or Content-MD5 header, not expired. The string to sign is
        `VERB\n\n\nExpires\n/bucket/key` (sprox.s3.sigv2), signed with HMAC-SHA1."""
        cdef const char *q = buf + query.at
        cdef Py_ssize_t at = 0, end, eq, n
        cdef Span values[3]
        cdef int seen = 0, which
        if h.authorization >= 0 or h.amz_date >= 0 or h.content_sha256 >= 0 or h.checksum_mode >= 0 \
                or h.content_headers:
            return -1
        while at < query.n:
            end = at
            eq = -1
            while end < query.n and q[end] != c'&':
                if q[end] == c'=' and eq < 0:
                    eq = end
                end += 1
            if eq < 0:
                return -1
            if eq - at == 14 and memcmp(q + at, b"AWSAccessKeyId", 14) == 0:
                which = 0
            elif eq - at == 9 and memcmp(q + at, b"Signature", 9) == 0:
                which = 1
            elif eq - at == 7 and memcmp(q + at, b"Expires", 7) == 0:
                which = 2
            else:
                return -1
            if seen & (1 << which) or memchr(q + eq + 1, c'+', end - eq - 1) is not NULL:
                return -1  # (a '+' is a space to the Python lane)
            seen |= 1 << which
            values[which].at = query.at + eq + 1
            values[which].n = end - eq - 1
            at = end + 1
        if seen != 7 or q[query.n - 1] == c'&' or values[0].n > 128 or values[1].n > 96:
            return -1
        cdef int64_t expires = _digits(buf + values[2].at, values[2].n)
        if values[2].n > 12 or expires < 0 or now > <double>expires:
            return -1
        cdef char *decoded = self._fields
        n = _decode_path(buf + values[0].at, values[0].n, decoded)
        cdef int slot = -1, k
        for k in range(self._key_count):
            if self._keys[k].access_key_len == n and memcmp(self._keys[k].access_key, decoded, n) == 0:
                slot = k
                break
        if slot < 0 or not self._keys[slot].has_v2:
            return -1
        cdef char *c = self._canonical
        cdef Py_ssize_t o
        if path.n + 48 > CANONICAL_BYTES:
            return -1
        o = _put(c, 0, b"GET\n\n\n" if h.method == 1 else b"HEAD\n\n\n", 6 if h.method == 1 else 7)
        o = _put(c, o, buf + values[2].at, values[2].n)
        c[o] = c'\n'
        o = _put(c, o + 1, buf + path.at, path.n)
        cdef unsigned char mac[20]
        cdef unsigned char inner[20]
        cdef SHA_CTX sha = self._keys[slot].v2.inner
        SHA1_Update(&sha, c, o)
        SHA1_Final(inner, &sha)
        sha = self._keys[slot].v2.outer
        SHA1_Update(&sha, inner, 20)
        SHA1_Final(mac, &sha)
        cdef char expected[28]
        _base64_20(mac, expected)
        n = _decode_path(buf + values[1].at, values[1].n, decoded)
        if n != 28 or CRYPTO_memcmp(expected, decoded, 28) != 0:
            return -1
        return slot

    cdef bint _query_fields(self, const char *buf, Head *h, Span query, SigFields *f) noexcept:
        """A presigned URL's fields: exactly the six X-Amz-* parameters of SigV4, each
        once and already in canonical (RFC 3986, upper-case hex) form, and nothing else
        in the query (a response-* override, versionId, ...: the Python lane's)."""
        cdef const char *q = buf + query.at
        cdef Py_ssize_t at = 0, end, eq, n
        cdef Span values[6]
        cdef int seen = 0, which
        while at < query.n:
            end = at
            eq = -1
            while end < query.n and q[end] != c'&':
                if q[end] == c'=' and eq < 0:
                    eq = end
                end += 1
            if eq < 0:
                return False
            which = _presign_param(q + at, eq - at)
            if which < 0 or seen & (1 << which) or not _canonical_component(q + eq + 1, end - eq - 1):
                return False
            seen |= 1 << which
            values[which].at = query.at + eq + 1
            values[which].n = end - eq - 1
            at = end + 1
        if seen != 63 or q[query.n - 1] == c'&':
            return False
        # Algorithm
        if values[0].n != 16 or memcmp(buf + values[0].at, b"AWS4-HMAC-SHA256", 16) != 0:
            return False
        if values[1].n > 256 or values[4].n > 256:
            return False  # (each is decoded into 256 bytes of _fields)
        # Credential: AK%2FYYYYMMDD%2Fregion%2Fs3%2Faws4_request, decoded into _fields
        n = _decode_path(buf + values[1].at, values[1].n, self._fields)
        if n < 0 or not _credential(self._fields, n, f):
            return False
        # Date
        if not _amz_date_shape(buf + values[2].at, values[2].n) or memcmp(buf + values[2].at, f.date, 8) != 0:
            return False
        f.timestamp = buf + values[2].at
        # Expires: 1 second to 7 days
        f.expires = _digits(buf + values[3].at, values[3].n)
        if values[3].n > 12 or f.expires < 1 or f.expires > MAX_PRESIGN_SECONDS:
            return False
        # SignedHeaders: host%3Bx-amz-..., decoded after the credential
        n = _decode_path(buf + values[4].at, values[4].n, self._fields + 256)
        if n <= 0 or n > 256 or not _signed_names(self._fields + 256, n):
            return False
        f.signed = self._fields + 256
        f.signed_n = n
        # Signature
        if values[5].n != 64 or not _lower_hex(buf + values[5].at, 64):
            return False
        f.signature = buf + values[5].at
        # The canonical query: the parameters but the signature, sorted by name (the
        # order of _PRESIGN_NAMES), each already canonical.
        cdef char *cq = self._fields + 512
        cdef Py_ssize_t o = 0
        for which in range(5):
            if o + 24 + values[which].n > 2048:
                return False
            if which:
                cq[o] = c'&'
                o += 1
            o = _put(cq, o, _PRESIGN_NAMES[which], _PRESIGN_LENGTHS[which])
            cq[o] = c'='
            o = _put(cq, o + 1, buf + values[which].at, values[which].n)
        f.canonical_query = cq
        f.canonical_query_n = o
        if h.content_sha256 >= 0:
            f.payload = buf + h.values[h.content_sha256].at
            f.payload_n = h.values[h.content_sha256].n
        else:
            f.payload = b"UNSIGNED-PAYLOAD"
            f.payload_n = 16
        return True

    cdef int _answer(self, int sock_fd, const char *buf, Head *h, Entry *e, int key_slot, bint use_sendfile,
                     double started_at, double started) except -1:
        cdef int status = 200
        cdef int64_t first = 0, last = e.size - 1
        cdef const char *template = e.template
        cdef Py_ssize_t template_len = e.template_len
        if h.range_ >= 0:
            if h.values[h.range_].n > MAX_RANGE_BYTES:
                return _DECLINED
            if not _range(buf + h.values[h.range_].at, h.values[h.range_].n, e.size, &first, &last):
                return _DECLINED
            status = 206
        elif h.checksum_mode >= 0 and h.values[h.checksum_mode].n == 7 \
                and _same_lower(buf + h.values[h.checksum_mode].at, b"enabled", 7):
            if e.template_ck is NULL:
                return _DECLINED  # the Python lane asks the origin for them
            template = e.template_ck
            template_len = e.template_ck_len
        cdef int64_t length = last - first + 1
        cdef int64_t first_block = 0, last_block = -1, i
        cdef const char *present
        cdef const char *unverified
        cdef bint body = h.method == 1 and length > 0
        if body:
            first_block = first // e.block_size
            last_block = last // e.block_size
            if sprox_bytearray_size(e.present) * 8 <= last_block \
                    or sprox_bytearray_size(e.unverified) * 8 <= last_block:
                return _DECLINED
            present = sprox_bytearray_data(e.present)
            unverified = sprox_bytearray_data(e.unverified)
            for i in range(first_block, last_block + 1):
                if not (present[i >> 3] >> (i & 7)) & 1 or (unverified[i >> 3] >> (i & 7)) & 1:
                    return _DECLINED
            if not use_sendfile and length > COPY_MAX:
                return _DECLINED  # the Python lane copies it in pieces
        cdef int agent = -1
        if h.user_agent >= 0:
            agent = self._agent(buf + h.values[h.user_agent].at, h.values[h.user_agent].n)
            if agent == -2:
                return _DECLINED  # too many distinct agents to log here

        # Render the head.
        cdef char *out = self._out
        cdef Py_ssize_t o
        if template_len + 512 > MAX_HEAD + 4096:  # (the rest of the head is under 512 bytes)
            return _DECLINED
        o = _put(out, 0, b"HTTP/1.1 200 OK\r\n" if status == 200 else b"HTTP/1.1 206 Partial Content\r\n",
                 17 if status == 200 else 30)
        self._refresh_date(<time_t>started_at)
        o = _put(out, o, self._date_line, self._date_len)
        o = _put(out, o, b"Server: Sprox\r\n", 15)
        o = _put(out, o, template, template_len)
        if status == 206:
            o = _put(out, o, b"Content-Range: bytes ", 21)
            o = _put_int(out, o, first)
            out[o] = c'-'
            o = _put_int(out, o + 1, last)
            out[o] = c'/'
            o = _put_int(out, o + 1, e.size)
            o = _put(out, o, b"\r\n", 2)
        o = _put(out, o, b"X-Cache: HIT\r\nx-amz-request-id: ", 32)
        cdef char request_id[16]
        self._next_request_id(request_id)
        o = _put(out, o, request_id, 16)
        o = _put(out, o, b"\r\nContent-Length: ", 18)
        o = _put_int(out, o, length)
        if h.close:
            o = _put(out, o, b"\r\nConnection: close", 19)
        o = _put(out, o, b"\r\n\r\n", 4)
        cdef Py_ssize_t head_len = o
        cdef iovec io
        cdef ssize_t got
        cdef bint copied = False
        if body and (not use_sendfile or length <= COALESCE_MAX):
            # Head and body in one send: for a small body this costs less than a
            # sendfile after the head (one segment, one wake-up of the client).
            io.iov_base = out + o
            io.iov_len = length
            got = preadv2(e.fd, &io, 1, first, RWF_NOWAIT)
            if got == length:
                copied = True
                o += length
            elif not use_sendfile:
                return _DECLINED  # not in the page cache (or short): the Python lane reads it

        # The log record, written now so a failure below is logged too.
        cdef LogRecord *r = &self._ring[self._ring_head % RING_RECORDS]
        r.started_at = started_at
        r.first_byte = first if h.method == 1 else -1
        r.object_size = e.size
        r.record_id = e.record_id
        r.first_block = first_block
        r.last_block = last_block
        r.bucket = e.bucket
        Py_INCREF(<object>e.bucket)
        r.key = e.key
        Py_INCREF(<object>e.key)
        r.status = status
        r.method = h.method
        r.key_slot = key_slot
        r.agent = agent
        memcpy(r.request_id, request_id, 16)
        if h.range_ >= 0:
            memcpy(r.range_, buf + h.values[h.range_].at, h.values[h.range_].n)
            r.range_len = h.values[h.range_].n
        else:
            r.range_len = -1
        self.hits += 1

        # Send.
        cdef ssize_t sent_head = 0, w
        cdef int64_t sent_body = 0
        cdef off_t offset = first
        cdef int result = _SENT_CLOSE if h.close else _SENT
        # (No MSG_MORE before a sendfile: on loopback it held the tail of 64 KiB answers
        # back, measured 60 against 36 us of CPU per answer.)
        cdef int flags = MSG_NOSIGNAL
        self._pending_length = length if body else 0
        self._pending_close = h.close
        self.partials += 1  # (taken back below unless the answer is PARTIAL)
        while sent_head < o:
            w = send(sock_fd, out + sent_head, o - sent_head, flags)
            if w < 0:
                if errno == EINTR:
                    continue
                if errno == EAGAIN:
                    break
                result = _FAILED
                break
            sent_head += w
        if body and copied:
            sent_body = sent_head - head_len if sent_head > head_len else 0
            if result != _FAILED and sent_head < o:
                self._partial(r, sent_head, o, first + length, 0, sent_body, started)
                return _PARTIAL
        elif body and result != _FAILED:
            if sent_head < o:
                self._partial(r, sent_head, o, first, length, 0, started)
                return _PARTIAL
            while sent_body < length:
                w = sendfile(sock_fd, e.fd, &offset, length - sent_body)
                if w < 0:
                    if errno == EINTR:
                        continue
                    if errno == EAGAIN:
                        self._partial(r, o, o, first + sent_body, length - sent_body, sent_body, started)
                        return _PARTIAL
                    result = _FAILED
                    break
                if w == 0:
                    result = _FAILED_FILE
                    break
                sent_body += w
        elif result != _FAILED and sent_head < o:
            self._partial(r, sent_head, o, 0, 0, 0, started)
            return _PARTIAL
        self.partials -= 1
        r.bytes_sent = sent_body if result == _SENT or result == _SENT_CLOSE else 0
        r.seconds = _now(CLOCK_MONOTONIC) - started
        self.bytes_sent += r.bytes_sent
        self._count(r)
        self._ring_head += 1
        return result

    cdef void _partial(self, LogRecord *r, Py_ssize_t head_at, Py_ssize_t head_end, int64_t offset,
                       int64_t remaining, int64_t sent_body, double started) noexcept:
        """Keep what is left to send for take_pending(); the record moves out of the ring
        (it is logged when the Python lane has sent the rest)."""
        if self._has_pending:  # (never: the lane takes each one at once)
            _release_log(&self._pending_log)
        self._pending_log = r[0]
        self._pending_log.bytes_sent = sent_body
        self._pending_log.seconds = started  # log_pending turns it into the duration
        memset(r, 0, sizeof(LogRecord))
        self._pending_head_at = head_at
        self._pending_head_end = head_end
        self._pending_offset = offset
        self._pending_remaining = remaining
        self._has_pending = True

    cdef int _agent(self, const char *value, Py_ssize_t n) except -3:
        """The index of this User-Agent among those remembered; -2 when there is no
        room for another."""
        cdef int i
        for i in range(self._agent_count):
            if self._agent_lengths[i] == n and memcmp(self._agents[i], value, n) == 0:
                return i
        if self._agent_count == MAX_AGENTS or n > MAX_AGENT_BYTES:
            return -2
        i = self._agent_count
        memcpy(self._agents[i], value, n)
        self._agent_lengths[i] = n
        self._agent_names.append(value[:n].decode("ascii"))  # once per distinct agent
        self._agent_count += 1
        return i

    cdef void _refresh_date(self, time_t now) noexcept:
        cdef tm t
        if now == self._date_second:
            return
        self._date_second = now
        gmtime_r(&now, &t)
        cdef char *d = self._date_line
        cdef Py_ssize_t o = _put(d, 0, b"Date: ", 6)
        o = _put(d, o, DAYS + 3 * t.tm_wday, 3)
        o = _put(d, o, b", ", 2)
        d[o] = c'0' + t.tm_mday // 10
        d[o + 1] = c'0' + t.tm_mday % 10
        d[o + 2] = c' '
        o = _put(d, o + 3, MONTHS + 3 * t.tm_mon, 3)
        d[o] = c' '
        o = _put_int(d, o + 1, t.tm_year + 1900)
        d[o] = c' '
        d[o + 1] = c'0' + t.tm_hour // 10
        d[o + 2] = c'0' + t.tm_hour % 10
        d[o + 3] = c':'
        d[o + 4] = c'0' + t.tm_min // 10
        d[o + 5] = c'0' + t.tm_min % 10
        d[o + 6] = c':'
        d[o + 7] = c'0' + t.tm_sec // 10
        d[o + 8] = c'0' + t.tm_sec % 10
        o = _put(d, o + 9, b" GMT\r\n", 6)
        self._date_len = o

    cdef void _next_request_id(self, char *out) noexcept:
        cdef uint32_t n = self._id_counter
        cdef int i
        self._id_counter += 1
        memcpy(out, self._id_prefix, 8)
        for i in range(8):
            out[15 - i] = HEX_UPPER[n & 15]
            n >>= 4


cdef inline bint _plain(const char *v, Py_ssize_t n) noexcept nogil:
    """The twin's plain_value: no run of spaces inside (the scanner already refused
    tabs and non-ASCII, and trimmed the ends)."""
    cdef Py_ssize_t i
    for i in range(n - 1):
        if v[i] == c' ' and v[i + 1] == c' ':
            return False
    return True


cdef void _derive(KeySlot *key, const char *date, const char *region, Py_ssize_t region_n) noexcept nogil:
    """The signing key for (date, region), as HMAC prefixes."""
    cdef unsigned char k[64]
    cdef unsigned char out[32]
    cdef size_t k_len = key.secret_len
    memcpy(k, key.secret, k_len)
    _hmac_once(k, k_len, date, 8, out)
    _hmac_once(out, 32, region, region_n, out)
    _hmac_once(out, 32, b"s3", 2, out)
    _hmac_once(out, 32, b"aws4_request", 12, out)
    _keyed_hmac(out, 32, &key.hmac)
    memcpy(key.date, date, 8)
    memcpy(key.region, region, region_n)
    key.region_len = region_n
    key.keyed = True


cdef inline void _allow(Entry *e, int key_slot) noexcept:
    cdef int i
    if key_slot < 0:
        return
    for i in range(e.allowed_count):
        if e.allowed[i] == key_slot:
            return
    if e.allowed_count < MAX_ALLOWED:
        e.allowed[e.allowed_count] = key_slot
        e.allowed_count += 1


cdef inline bint _allowed(Entry *e, int key_slot) noexcept nogil:
    cdef int i
    for i in range(e.allowed_count):
        if e.allowed[i] == key_slot:
            return True
    return False


cdef void _free_entry(Entry *e) noexcept:
    Py_XDECREF(e.present)
    Py_XDECREF(e.unverified)
    Py_XDECREF(e.bucket)
    Py_XDECREF(e.key)
    free(e.name)
    free(e.template)
    free(e.template_ck)
    free(e)


cdef struct StrColumn:
    # An Arrow string column being filled: validity bits, int32 offsets, UTF-8 data.
    uint8_t *valid
    int32_t *offsets
    char *data
    int32_t used


cdef inline Py_ssize_t _utf8_size(PyObject *text) noexcept:
    """The UTF-8 size of a str (0 if it has none: a lone surrogate; it is logged null)."""
    cdef Py_ssize_t size = 0
    if text is NULL or PyUnicode_AsUTF8AndSize(<object>text, &size) is NULL:
        PyErr_Clear()
        return 0
    return size


cdef inline const char *_utf8(PyObject *text, Py_ssize_t *size) noexcept:
    """A str's UTF-8 bytes (cached in the str by CPython), or NULL."""
    cdef const char *data
    if text is NULL:
        return NULL
    data = PyUnicode_AsUTF8AndSize(<object>text, size)
    if data is NULL:
        PyErr_Clear()
    return data


cdef inline void _column_put(StrColumn *c, Py_ssize_t i, const char *text, Py_ssize_t n) noexcept:
    if text is NULL:
        _column_null(c, i)
        return
    memcpy(c.data + c.used, text, n)
    c.used += <int32_t>n
    c.offsets[i + 1] = c.used
    c.valid[i >> 3] |= <uint8_t>(1 << (i & 7))


cdef inline void _column_null(StrColumn *c, Py_ssize_t i) noexcept:
    c.offsets[i + 1] = c.used


cdef bytes _zeroed(Py_ssize_t size):
    cdef bytes b = PyBytes_FromStringAndSize(NULL, size)
    memset(PyBytes_AS_STRING(b), 0, size)
    return b


cdef class _Columns:
    """drain()'s output being filled: each column's buffers are bytes objects made
    once, at their final size, and written through C pointers before anyone sees them."""
    cdef Py_ssize_t n
    cdef list _buffers
    cdef int64_t *time_us
    cdef char *request_id
    cdef int32_t *request_id_offsets
    cdef StrColumn operation, bucket, key, range_, cache, user_agent, access_key
    cdef int16_t *status
    cdef int64_t *bytes_sent
    cdef double *latency_ms
    cdef int64_t *first_byte
    cdef uint8_t *first_byte_valid
    cdef int64_t *object_size

    def __cinit__(self, Py_ssize_t n, Py_ssize_t op_bytes, Py_ssize_t bucket_bytes, Py_ssize_t key_bytes,
                  Py_ssize_t range_bytes, Py_ssize_t agent_bytes, Py_ssize_t akey_bytes):
        self.n = n
        self._buffers = []
        self.time_us = <int64_t *>self._buffer(8 * n)
        self.request_id_offsets = <int32_t *>self._buffer(4 * (n + 1))
        self.request_id = self._buffer(16 * n)
        self._string(&self.operation, op_bytes)
        self._string(&self.bucket, bucket_bytes)
        self._string(&self.key, key_bytes)
        self._string(&self.range_, range_bytes)
        self.status = <int16_t *>self._buffer(2 * n)
        self.bytes_sent = <int64_t *>self._buffer(8 * n)
        self._string(&self.cache, 3 * n)
        self._buffer(4 * n)  # upstream_requests: zeros
        self._buffer(8 * n)  # upstream_bytes: zeros
        self.latency_ms = <double *>self._buffer(8 * n)
        self._string(&self.user_agent, agent_bytes)
        self._string(&self.access_key, akey_bytes)
        self.first_byte_valid = <uint8_t *>self._buffer((n + 7) // 8)
        self.first_byte = <int64_t *>self._buffer(8 * n)
        self.object_size = <int64_t *>self._buffer(8 * n)

    cdef char *_buffer(self, Py_ssize_t size) except NULL:
        cdef bytes b = _zeroed(size)
        self._buffers.append(b)
        return PyBytes_AS_STRING(b)

    cdef int _string(self, StrColumn *c, Py_ssize_t data_bytes) except -1:
        if data_bytes >= 2**31:
            raise OverflowError("access log batch over 2 GiB of text")
        c.valid = <uint8_t *>self._buffer((self.n + 7) // 8)
        c.offsets = <int32_t *>self._buffer(4 * (self.n + 1))
        c.data = self._buffer(data_bytes)
        c.used = 0
        return 0

    def as_tuple(self):
        """(count, then per column of accesslog.SCHEMA, in order: its buffers, one
        bytes object for a column without nulls, a tuple of them for a string column
        (validity bits, offsets, data; request_id has no validity bits) or a nullable
        one (validity bits, values))."""
        b = self._buffers
        return (self.n, b[0], (b[1], b[2]), (b[3], b[4], b[5]), (b[6], b[7], b[8]), (b[9], b[10], b[11]),
                (b[12], b[13], b[14]), b[15], b[16], (b[17], b[18], b[19]), b[20], b[21], b[22],
                (b[23], b[24], b[25]), (b[26], b[27], b[28]), (b[29], b[30]), b[31])


cdef void _release_log(LogRecord *r) noexcept:
    Py_XDECREF(r.bucket)
    Py_XDECREF(r.key)
    r.bucket = NULL
    r.key = NULL
