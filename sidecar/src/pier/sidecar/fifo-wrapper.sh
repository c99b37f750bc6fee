#!/bin/sh
# Pier FIFO wrapper: runs a stdio MCP server with its stdin/stdout on the FIFOs that the
# bridge container shares through an emptyDir. Needs nothing but /bin/sh.
#   usage: /bin/sh DIR/fifo-wrapper.sh DIR COMMAND [ARGS...]
set -eu
if [ "$#" -lt 2 ]; then
    echo "usage: $0 DIR COMMAND [ARGS...]" >&2
    exit 64
fi
dir=$1
shift
if [ ! -p "$dir/stdin" ] || [ ! -p "$dir/stdout" ]; then
    echo "pier: $dir/stdin and $dir/stdout must be FIFOs created by the bridge" >&2
    exit 66
fi
# Opening stdin waits for the bridge to connect; stdout never waits (the bridge's reader is open).
exec "$@" <"$dir/stdin" >"$dir/stdout"
