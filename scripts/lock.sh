#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: install `.[dev]` into a fresh venv under /tmp and pin
# what pip resolved. Run it after any dependency change in pyproject.toml, then `pytest tests/test_lock.py`.
#   bash scripts/lock.sh                 # PYTHON=python3.11 by default; LOCK=requirements.lock
# The lock is a pip constraints file: `pip install -c requirements.lock -e ".[dev]"` (Makefile, .ci, image).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.11}
lock=${LOCK:-requirements.lock}
venv=$(mktemp -d /tmp/semanticmim-lock.XXXXXX)
trap 'rm -rf "$venv"' EXIT

"$python" -m venv "$venv"
# This machine's pip config may list local wheel folders; pip's warnings about their absent entries are noise.
quiet_pip() { "$venv/bin/pip" "$@" 2> >(grep -v -F 'is ignored: it is neither a file nor a directory' >&2); }
quiet_pip install --quiet --upgrade pip
quiet_pip install --quiet -e ".[dev]"
"$venv/bin/pip" check

# --all keeps pip (the image installs the locked pip) and setuptools (torch requires it at run time); wheel
# is only a build tool; the project itself is the editable install.
frozen=$("$venv/bin/pip" freeze --all --exclude-editable | grep -v -i -E '^wheel==' |
    LC_ALL=C sort -f -t= -k1,1)
if grep -q -v -E '^[A-Za-z0-9._-]+==[^ ;@]+$' <<<"$frozen"; then
    echo "lock.sh: pip freeze printed a line that is not NAME==VERSION:" >&2
    grep -v -E '^[A-Za-z0-9._-]+==[^ ;@]+$' <<<"$frozen" >&2
    exit 1
fi
{
    echo "# requirements.lock: every package of \`pip install -e \".[dev]\"\`, pinned. Generated from pyproject.toml"
    echo "# by scripts/lock.sh; do not edit by hand. Use as constraints: pip install -c requirements.lock -e \".[dev]\""
    where=$("$venv/bin/python" -c 'import platform as p; print(p.system(), p.machine(), "Python", p.python_version())')
    echo "# Resolved on $where, $("$venv/bin/pip" --version | cut -d' ' -f1-2)."
    echo "# nvidia-*, cuda-* and triton are what PyPI's Linux x86_64 torch needs; elsewhere pip does not install them."
    echo "$frozen"
} >"$lock.tmp"
mv "$lock.tmp" "$lock"
echo "wrote $lock ($(grep -c -v '^#' "$lock") packages)"
