#!/bin/sh
# Create the project's virtual environment on a fresh Debian machine: install python3-venv
# from Debian if needed, then every distribution of the checkout (editable) from PyPI.
set -eu
PYTHON="${1:-python3}"
VENV="${2:-.venv}"

if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "python3-venv is missing; install it (apt-get install python3-venv) or run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv python3-pip >/dev/null
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ./protocol -e './hub[postgresql]' -e ./spoke \
    -e './algorithm-sdk[dicom,flower]' -e ./cli -e './testbed[dev]'
