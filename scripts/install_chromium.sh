#!/usr/bin/env bash
# Install headless Chromium (Debian packages chromium and chromium-driver) for the report's browser check
# (tests/test_report.py::test_report_renders_in_headless_chromium, marked slow). Idempotent: does nothing
# when all are already installed (fonts-liberation: so the screenshot shows text).
set -euo pipefail

missing=()
for pkg in chromium chromium-driver fonts-liberation; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "chromium, chromium-driver and fonts-liberation are already installed: $(chromium --version 2>/dev/null || echo unknown version)"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "error: installing ${missing[*]} needs root (or sudo)" >&2; exit 2; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y --no-install-recommends "${missing[@]}"
echo "installed: $(chromium --version)"
