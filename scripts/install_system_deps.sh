#!/usr/bin/env bash
# The system packages the test suite needs besides the Python ones: Debian's headless browser and its
# WebDriver, which tests/test_serve.py drives through selenium (no Python package downloads a browser here).
# Installs them with apt-get when they are missing (sudo when not root); does nothing when they are there.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "system deps: $(/usr/bin/chromium --version 2>/dev/null | head -1) and chromedriver already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "system deps: install Chromium and its chromedriver with your package manager (found no apt-get);" \
         "tests/test_serve.py::test_browser_upload_run_result needs /usr/bin/chromium and /usr/bin/chromedriver" >&2
    exit 1
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
/usr/bin/chromium --version
