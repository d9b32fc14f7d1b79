#!/bin/sh
# Starts nginx with one upstream line per charstream replica. nginx's consistent hash places
# servers on its ring by name, so the replicas behind one DNS name (compose's service name) would
# share one place and be picked round-robin; written out by address, each gets its own.
# Usage: nginx-start.sh [NAME [PORT]]   (default: charstream 8000)
set -eu
name=${1:-charstream}
port=${2:-8000}
out=/etc/nginx/charstream-upstreams.conf
for _ in $(seq 60); do
    addresses=$(getent ahostsv4 "$name" | awk '{print $1}' | sort -u)
    [ -n "$addresses" ] && break
    sleep 1
done
[ -n "$addresses" ] || { echo "nginx-start.sh: $name does not resolve" >&2; exit 1; }
for a in $addresses; do
    echo "server $a:$port max_fails=3 fail_timeout=5s;"
done > "$out"
echo "nginx-start.sh: upstreams: $(echo $addresses)" >&2
exec nginx -g 'daemon off;'
