#!/bin/sh
# Router for the API. busybox httpd passes CGI output through unchanged when it starts with "HTTP",
# which is the only way to choose a status other than 200 (it ignores a "Status:" header).
. /app/settings.env

version="${APP_VERSION:-dev}"

respond() {
    # $1 status line, $2 JSON body
    printf 'HTTP/1.0 %s\r\nContent-Type: application/json\r\nCache-Control: no-store\r\n' "$1"
    printf 'Content-Length: %s\r\nConnection: close\r\n\r\n%s' "${#2}" "$2"
}

path="${REQUEST_URI%%\?*}"

case "$path" in
    /api/health/)
        if [ "${HEALTHY:-true}" = "true" ]; then
            respond "200 OK" "{\"status\": \"ok\", \"version\": \"$version\"}"
        else
            respond "500 Internal Server Error" \
                "{\"status\": \"error\", \"version\": \"$version\", \"reason\": \"HEALTHY=false in settings.env\"}"
        fi
        ;;
    /api/meals/)
        respond "200 OK" '[{"id": 1, "name": "Oatmeal", "kcal": 350}, {"id": 2, "name": "Lentil soup", "kcal": 420}]'
        ;;
    *)
        respond "404 Not Found" "{\"detail\": \"not found\"}"
        ;;
esac
