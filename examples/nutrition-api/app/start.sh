#!/bin/sh
# Entry point: busybox httpd serves /app/www; every URL ending in "/" without an index.html is handed
# to /cgi-bin/index.cgi (busybox's directory fallback), which routes /api/... requests.
set -eu

. /app/settings.env

if [ "${CRASH_ON_START:-false}" = "true" ]; then
    echo "nutrition-api ${APP_VERSION:-dev}: CRASH_ON_START=true in settings.env, exiting" >&2
    exit 1
fi

echo "nutrition-api ${APP_VERSION:-dev} listening on :${PORT:-8000}" >&2
exec httpd -f -p "${PORT:-8000}" -h /app/www
