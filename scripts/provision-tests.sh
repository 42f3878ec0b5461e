#!/usr/bin/env bash
# What the test suite needs beyond the Python packages of pyproject.toml; `make test` and
# .ci/run both call this. Each step is skipped when its tool is already there.
set -euo pipefail
# The HTML-report test renders every page in headless Chromium (Debian's package).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "provision: installing Debian's chromium for the HTML-report test"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "provision: chromium is missing and cannot be installed here (needs root and apt-get);" \
         "install it (e.g. 'sudo apt-get install chromium') for the HTML-report test" >&2
    exit 1
  fi
fi
