#!/usr/bin/env bash
# Everything a fresh machine needs before the tests or the demo: Debian packages (as root), a
# virtual environment with the project installed, helm and kubectl, and the real Docker engine,
# registry and base image running. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
command -v docker-registry >/dev/null 2>&1 || need_pkgs+=(docker-registry)
[ -x /bin/busybox ] || command -v busybox >/dev/null 2>&1 || need_pkgs+=(busybox-static)
command -v git >/dev/null 2>&1 || need_pkgs+=(git)
command -v npm >/dev/null 2>&1 || need_pkgs+=(npm)
# The browser test (tests/browser) approves a promotion in the Prefect UI in Debian's Chromium.
[ -x /usr/bin/chromium ] || need_pkgs+=(chromium)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages ${need_pkgs[*]} and not root; install them and re-run" >&2
    exit 1
  fi
  echo "setup: apt-get install ${need_pkgs[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
if [ ! -e "$stamp" ]; then
  echo "setup: pip install -e .[dev]"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[dev]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi

# GitHub's REST OpenAPI description, which the fake GitHub in tests/github checks every request
# against. Pinned; kept out of Git under .tools/ (about 390 MB: it carries every GHES version too).
OCTOKIT_OPENAPI_VERSION=23.0.2
openapi_pkg=.tools/npm/node_modules/@octokit/openapi/package.json
if ! grep -q "\"version\": \"$OCTOKIT_OPENAPI_VERSION\"" "$openapi_pkg" 2>/dev/null; then
  echo "setup: npm install @octokit/openapi@$OCTOKIT_OPENAPI_VERSION into .tools/npm"
  mkdir -p .tools/npm
  npm install --prefix .tools/npm --no-audit --no-fund --save-exact --loglevel=error \
    "@octokit/openapi@$OCTOKIT_OPENAPI_VERSION" >/dev/null
fi

# Playwright's driver for the browser test, without its browser downloads (this machine has no
# internet; Debian's Chromium above is used). Pinned; kept out of Git under .tools/.
PLAYWRIGHT_CORE_VERSION=1.65.2
playwright_pkg=.tools/npm/node_modules/playwright-core/package.json
if ! grep -q "\"version\": \"$PLAYWRIGHT_CORE_VERSION\"" "$playwright_pkg" 2>/dev/null; then
  echo "setup: npm install playwright-core@$PLAYWRIGHT_CORE_VERSION into .tools/npm"
  mkdir -p .tools/npm
  npm install --prefix .tools/npm --no-audit --no-fund --save-exact --loglevel=error \
    "playwright-core@$PLAYWRIGHT_CORE_VERSION" >/dev/null
fi

.venv/bin/python scripts/install-helm.py
.venv/bin/python -m sandbox.engine
