#!/usr/bin/env bash
# Resolves shoal's dependencies (and the test extra) for a Raspberry Pi: Linux aarch64,
# CPython 3.11 (Raspberry Pi OS 64-bit, bookworm), wheels only, from PyPI, and lists the
# packages that have no aarch64 wheel and need a source build there. Exit 0 when that list
# is the expected one (EXPECTED in scripts/check_aarch64.py), 1 when it differs, 2 when pip
# failed otherwise. Needs network access to PyPI; downloads metadata only (pip --dry-run).
#   scripts/check_aarch64.sh                   both sets
#   scripts/check_aarch64.sh --no-test-extra   the dependencies only
#   scripts/check_aarch64.sh --index-url URL   another index (a PyPI mirror)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "check_aarch64: needs Python >= 3.11 (tomllib); set PYTHON=..." >&2
  exit 2
fi
exec "$python" "$here/check_aarch64.py" "$@"
