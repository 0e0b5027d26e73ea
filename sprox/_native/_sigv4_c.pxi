# SigV4's building blocks in C, shared by the modules that check signatures
# (`fastsig.pyx`, `kernel.pyx` include this file): SHA-256 and HMAC-SHA256 from
# OpenSSL's libcrypto, hex, and the x-amz-date arithmetic. Include, not cimport: each
# module gets its own copy of these small functions, inlined where they are called.

from libc.stdint cimport int64_t

# The low-level SHA-256 functions: OpenSSL 3 deprecates them in favour of EVP, whose
# per-call provider and context work cost more than hashing a canonical request (about
# 1 us each, measured). HMAC is done on them with the key's inner and outer states
# computed once per signing key.
cdef extern from *:
    """
    #define OPENSSL_SUPPRESS_DEPRECATED 1
    #include <openssl/sha.h>
    """
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c) nogil
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t length) nogil
    int SHA256_Final(unsigned char *md, SHA256_CTX *c) nogil

cdef extern from "openssl/crypto.h":
    int CRYPTO_memcmp(const void *a, const void *b, size_t length) nogil

cdef const char *HEX = b"0123456789abcdef"
# The twin's ALGORITHM_PREFIX and SCOPE_TAIL, as C constants (checked at import, below).
cdef const char *ALGORITHM_LINE = b"AWS4-HMAC-SHA256\n"
cdef Py_ssize_t ALGORITHM_LINE_BYTES = 17
cdef const char *SCOPE_END = b"/s3/aws4_request\n"
cdef Py_ssize_t SCOPE_END_BYTES = 17


cdef inline void _hex(const unsigned char *digest, char *out) noexcept nogil:
    cdef int i
    for i in range(32):
        out[2 * i] = HEX[digest[i] >> 4]
        out[2 * i + 1] = HEX[digest[i] & 15]


cdef inline int64_t _days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t mp = m + 9 if m <= 2 else m - 3
    cdef int64_t doy = (153 * mp + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef int64_t _amz_epoch(const char *t) noexcept nogil:
    """Seconds since the epoch of `YYYYMMDDTHHMMSSZ` (already checked for shape), or -1
    for a date that does not exist."""
    cdef int64_t year = (t[0] - 48) * 1000 + (t[1] - 48) * 100 + (t[2] - 48) * 10 + (t[3] - 48)
    cdef int64_t month = (t[4] - 48) * 10 + (t[5] - 48)
    cdef int64_t day = (t[6] - 48) * 10 + (t[7] - 48)
    cdef int64_t hour = (t[9] - 48) * 10 + (t[10] - 48)
    cdef int64_t minute = (t[11] - 48) * 10 + (t[12] - 48)
    cdef int64_t second = (t[13] - 48) * 10 + (t[14] - 48)
    cdef int leap = (year % 4 == 0 and year % 100 != 0) or year % 400 == 0
    cdef int month_days
    if month < 1 or month > 12 or day < 1 or hour > 23 or minute > 59 or second > 59:
        return -1
    if month == 2:
        month_days = 29 if leap else 28
    elif month == 4 or month == 6 or month == 9 or month == 11:
        month_days = 30
    else:
        month_days = 31
    if day > month_days:
        return -1
    return _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60 + second


cdef inline bint _amz_date_shape(const char *t, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if n != 16 or t[8] != c'T' or t[15] != c'Z':
        return False
    for i in range(15):
        if i != 8 and not (c'0' <= t[i] <= c'9'):
            return False
    return True


cdef struct KeyedHmac:
    # SHA-256 after absorbing key ^ ipad, and after key ^ opad: HMAC's two fixed prefixes.
    SHA256_CTX inner
    SHA256_CTX outer


cdef void _keyed_hmac(const unsigned char *key, size_t key_len, KeyedHmac *out) noexcept nogil:
    """HMAC-SHA256's prefixes for a key of at most 64 bytes."""
    cdef unsigned char pad[64]
    cdef size_t i
    for i in range(64):
        pad[i] = (key[i] if i < key_len else 0) ^ 0x36
    SHA256_Init(&out.inner)
    SHA256_Update(&out.inner, pad, 64)
    for i in range(64):
        pad[i] = (key[i] if i < key_len else 0) ^ 0x5c
    SHA256_Init(&out.outer)
    SHA256_Update(&out.outer, pad, 64)


cdef void _hmac(const KeyedHmac *keyed, const void *data, size_t length, unsigned char *mac) noexcept nogil:
    cdef SHA256_CTX ctx = keyed.inner
    cdef unsigned char inner_digest[32]
    SHA256_Update(&ctx, data, length)
    SHA256_Final(inner_digest, &ctx)
    ctx = keyed.outer
    SHA256_Update(&ctx, inner_digest, 32)
    SHA256_Final(mac, &ctx)


cdef void _hmac_once(const unsigned char *key, size_t key_len, const void *data, size_t length,
                     unsigned char *mac) noexcept nogil:
    cdef KeyedHmac keyed
    _keyed_hmac(key, key_len, &keyed)
    _hmac(&keyed, data, length, mac)


