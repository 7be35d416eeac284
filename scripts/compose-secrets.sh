#!/bin/sh
# Prints fresh credentials for compose/compose.yaml as an env file:
#   (umask 077; scripts/compose-secrets.sh > compose/.env)
#   docker compose --env-file compose/.env -f compose/compose.yaml -p inferpool up --build
# Hex only: the Redis passwords go into ACL lines and redis:// URLs unescaped.
set -eu
hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }
for role in API WORKER FLOWER; do
  echo "REDIS_${role}_PASSWORD=$(hex 24)"
done
echo "INFERPOOL_CACHE_KEY_SECRET=$(hex 32)"
echo "FLOWER_BASIC_AUTH=ops:$(hex 12)"
echo "GRAFANA_PASSWORD=$(hex 12)"
