#!/usr/bin/env bash
# Makes sure redis-server and memcached are on PATH: the tests and the demo start
# their own instances on loopback. Installs them with apt when run as root.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v memcached >/dev/null 2>&1 || missing+=(memcached)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts the packaged services; we run our own on free ports instead.
  for svc in redis-server memcached; do
    command -v service >/dev/null 2>&1 && service "$svc" stop >/dev/null 2>&1 || true
  done
else
  echo "error: ${missing[*]} not found on PATH." >&2
  echo "Install them, e.g. 'sudo apt-get install -y redis-server memcached' (Debian/Ubuntu)" >&2
  echo "or 'brew install redis memcached' (macOS), then re-run." >&2
  exit 1
fi
