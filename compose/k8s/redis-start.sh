#!/bin/sh
# Starts Redis with one ACL user per role, passwords from the environment (Secrets in
# Kubernetes, the env file in compose). The default user is off, so a client without
# a role's password can do nothing. Extra arguments go to redis-server.
#
#   api, worker  every key; no @admin or @dangerous commands (CONFIG, FLUSHALL, KEYS,
#                DEBUG, SHUTDOWN, MONITOR, ...). The worker also every channel (Celery's
#                mailbox and events); the API none, so its password cannot broadcast
#                remote-control commands such as shutdown
#   flower       Celery's mailbox, events and bindings, its lock on kombu's unacked
#                index, and read-only access to the queue lists: no job records,
#                results or in-flight messages
#   keda         LLEN on the queue lists, nothing else (only when its password is set)
#   health       PING, without a password, for health checks
set -eu
acl="${REDIS_ACL_FILE:-/tmp/inferpool-users.acl}"
for role in API WORKER FLOWER; do
  eval "password=\${REDIS_${role}_PASSWORD:-}"
  case "$password" in
    "" | *REPLACE*) echo "redis-start: set REDIS_${role}_PASSWORD (a random hex string)" >&2; exit 1 ;;
    # It goes into the ACL file and into the clients' redis:// URLs unescaped.
    *[!A-Za-z0-9_.-]*) echo "redis-start: REDIS_${role}_PASSWORD: use letters, digits, _ . - only" >&2; exit 1 ;;
  esac
done
umask 077
{
  echo "user default off"
  echo "user health on nopass -@all +ping"
  echo "user api on >${REDIS_API_PASSWORD} ~* resetchannels +@all -@admin -@dangerous"
  echo "user worker on >${REDIS_WORKER_PASSWORD} ~* &* +@all -@admin -@dangerous"
  echo "user flower on >${REDIS_FLOWER_PASSWORD} ~_kombu.* ~*pidbox* ~celery* ~unacked_mutex %R~unacked_index %R~inferpool.* &* +@all -@admin -@dangerous"
  if [ -n "${REDIS_KEDA_PASSWORD:-}" ]; then
    echo "user keda on >${REDIS_KEDA_PASSWORD} %R~inferpool.* -@all +@connection -@admin -@dangerous +llen"
  fi
} > "$acl"
exec redis-server --aclfile "$acl" --save '' --appendonly no "$@"
