#!/usr/bin/env bash
# Makes sure redis-server, memcached, haproxy and nginx are installed: the tests and the demo start
# their own instances on loopback. The tests also drive Flower's pages with headless
# chromium and validate compose/compose.yaml with docker-compose (no engine needed).
# Installs what is missing with apt when run as root.
set -euo pipefail
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v memcached >/dev/null 2>&1 || missing+=(memcached)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
# The load-balancer tests run HAProxy in front of several API replicas; the proxy
# benchmark measures nginx beside it.
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian starts the packaged services; we run our own on free ports instead.
  for svc in redis-server memcached haproxy nginx; do
    command -v service >/dev/null 2>&1 && service "$svc" stop >/dev/null 2>&1 || true
  done
else
  echo "error: ${missing[*]} not found on PATH." >&2
  echo "Install them, e.g. 'sudo apt-get install -y ${missing[*]}' (Debian/Ubuntu)" >&2
  echo "or your platform's packages (macOS: brew install redis memcached docker-compose; brew install --cask chromium), then re-run." >&2
  exit 1
fi
