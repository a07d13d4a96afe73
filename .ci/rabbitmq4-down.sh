#!/usr/bin/env bash
# Stops the RabbitMQ 4.0 node that rabbitmq4-up.sh started and unmounts the
# chroot's /proc. The chroot stays installed, so the next start is quick.
# Nothing to do is not an error.
set -uo pipefail

R=${RMQ4_ROOT:-/opt/rmq4}
NODE=${RMQ4_NODE:-rabbit4@localhost}
PIDFILE=/var/lib/rabbitmq/mnesia/$NODE.pid

log() { printf '== rabbitmq4: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || {
  log "needs root" >&2
  exit 1
}
R=$(realpath -m "$R")
[ -d "$R" ] || exit 0

cr() {
  chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 LC_ALL=C.UTF-8 "$@"
}

# The OS pid of this chroot's node, if it still runs.
node_pid() {
  local pid
  pid=$(cat "$R$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(readlink "/proc/$pid/root")" = "$R" ] &&
    echo "$pid"
}

if mountpoint -q "$R/proc" && cr rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  log "stopping $NODE"
  # Waits for the node's OS process to exit.
  cr rabbitmqctl -q stop "$PIDFILE" >/dev/null
fi
# A node the CLI could not reach (still booting, or wedged): its own pid,
# checked to be this chroot's, is told to stop, then killed.
if pid=$(node_pid); then
  log "terminating $NODE (pid $pid)"
  kill "$pid" 2>/dev/null
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
fi
# epmd, when the node had to start it, is left running: other Erlang nodes
# of the machine (the host's RabbitMQ) may be registered with it.
if mountpoint -q "$R/proc"; then
  umount "$R/proc" 2>/dev/null || umount -l "$R/proc"
fi
exit 0
