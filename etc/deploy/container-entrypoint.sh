#!/bin/sh
# The entry point of the regmirror container image (Containerfile).
#
# Without arguments: the mirror in the foreground as PID 1 (SIGTERM stops
# it, SIGHUP reloads), configured by /etc/regmirror/mirror.ini, its log on
# standard output: text, or JSON lines with REGMIRROR_LOG_FORMAT=json.
# With arguments: runs them instead, e.g.
#   regmirror cache stats -c /etc/regmirror/mirror.ini
set -eu
if [ "$#" -gt 0 ]; then
    exec "$@"
fi
case "${REGMIRROR_LOG_FORMAT:-text}" in
    text) set -- --logfile=- ;;
    json) set -- --logger=regmirror.logs.json_lines ;;
    *)
        echo "regmirror-entrypoint: REGMIRROR_LOG_FORMAT is text or json," \
            "not ${REGMIRROR_LOG_FORMAT}" >&2
        exit 2
        ;;
esac
exec twistd --nodaemon --pidfile= "$@" regmirror -c /etc/regmirror/mirror.ini
