#!/usr/bin/env bash
# Installs liburing (headers, shared library, pkg-config file) from its release source,
# for cibuildwheel's `before-all` in the manylinux images, whose distribution (AlmaLinux
# 8) has no liburing-devel recent enough. auditwheel then copies liburing.so into the
# wheel, so users need neither liburing nor its headers.
set -euo pipefail
# OpenSSL's libcrypto headers for sprox._native.fastsig (auditwheel bundles the library).
if command -v dnf >/dev/null 2>&1; then
    dnf install -y -q openssl-devel >/dev/null 2>&1 && echo "openssl-devel installed: $(rpm -q openssl-devel)"
fi
VERSION="${LIBURING_VERSION:-2.7}"
# The distribution's package when it has one (AlmaLinux 8's AppStream may).
if command -v dnf >/dev/null 2>&1 && dnf install -y -q liburing-devel >/dev/null 2>&1; then
    echo "liburing-devel installed with dnf: $(rpm -q liburing-devel)"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
curl -fsSL "https://github.com/axboe/liburing/archive/refs/tags/liburing-${VERSION}.tar.gz" | tar xz
cd "liburing-liburing-${VERSION}"
./configure --prefix="${PREFIX:-/usr/local}"
make -j"$(nproc)" -C src
make -C src install
# pkg-config looks in /usr/local/lib/pkgconfig on these images; say so anyway.
echo "liburing ${VERSION} installed: $(pkg-config --modversion liburing 2>/dev/null || echo '(no pkg-config)')"
