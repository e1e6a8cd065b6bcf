#!/usr/bin/env bash
# make data: obtain Fashion-MNIST (and MNIST where it can be had) for the reproduction and the figures.
#  1. Debian's dataset-fashion-mnist package, through apt-get where that works (root, apt);
#  2. else torchvision's download into expandctl's data cache ($EXPANDCTL_DATA, else ~/.cache/expandctl/data),
#     where the network allows;
#  3. else one line saying what to run, and exit 2.
# MNIST has no Debian package: only step 2, and its failure is reported, not fatal (nothing here needs it).
set -uo pipefail
PY=${PYTHON:-.venv/bin/python}

# find NAME [download]: exit 0 if expandctl can read the set (after fetching it, with "download").
find_set() {
    "$PY" - "$@" <<'PY'
import sys
from expandctl.errors import ExpandctlError
from expandctl.data import DataOptions, load_data
try:
    load_data(sys.argv[1], options=DataOptions(download=len(sys.argv) > 2))
except ExpandctlError as e:
    print(e, file=sys.stderr)
    sys.exit(2)
PY
}

if find_set fashion-mnist 2>/dev/null; then
    echo "Fashion-MNIST: found"
else
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "Fashion-MNIST: installing Debian's dataset-fashion-mnist with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
            || echo "Fashion-MNIST: apt-get could not install dataset-fashion-mnist; trying a download"
    fi
    if find_set fashion-mnist 2>/dev/null; then
        echo "Fashion-MNIST: ready"
    elif find_set fashion-mnist download 2>/dev/null; then
        echo "Fashion-MNIST: downloaded into the data cache"
    else
        echo "Fashion-MNIST is not available: install Debian's package as root (apt-get install dataset-fashion-mnist), or on a machine with a network run 'make data' again, or put the four IDX files in \$EXPANDCTL_DATA/fashion-mnist" >&2
        exit 2
    fi
fi
if find_set mnist 2>/dev/null; then
    echo "MNIST: found"
elif find_set mnist download 2>/dev/null; then
    echo "MNIST: downloaded into the data cache"
else
    echo "MNIST: not available (no Debian package, and the download failed); nothing in make figures needs it"
fi
