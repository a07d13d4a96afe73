#!/usr/bin/env bash
# A RabbitMQ 4.0 node (Debian trixie's rabbitmq-server) beside the machine's
# own RabbitMQ, for the idemq-rabbitmq tests' second pass: node
# rabbit4@localhost in a debootstrap chroot at $RMQ4_ROOT (default /opt/rmq4),
# AMQP on 127.0.0.1:5673, distribution on 25673, user guest/guest (RabbitMQ
# lets guest in from loopback only, which is where the tests connect from).
#
# Idempotent: a node that answers is left alone; an installed chroot is only
# started (~4 s); a missing or half-built one is built first (~35 s plus the
# download). Needs root and the Debian mirror. Stop it with rabbitmq4-down.sh.
set -euo pipefail

R=${RMQ4_ROOT:-/opt/rmq4}
MIRROR=${RMQ4_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
NODE=${RMQ4_NODE:-rabbit4@localhost}
PORT=${RMQ4_PORT:-5673}
DIST_PORT=${RMQ4_DIST_PORT:-25673}
PIDFILE=/var/lib/rabbitmq/mnesia/$NODE.pid
LOGDIR=/var/log/rabbitmq

log() { printf '== rabbitmq4: %s\n' "$*"; }
die() {
  printf '== rabbitmq4: %s\n' "$*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount)"
R=$(realpath -m "$R")

# Commands in the chroot run with a clean environment: none of the host's
# RABBITMQ_*, ERL_* or locale variables may steer the 4.0 node or its CLI
# (the Elixir CLI wants a UTF-8 locale; trixie's libc has C.UTF-8 built in).
cr() {
  chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 LC_ALL=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
}

# apt on the host. On a fresh machine apt-get update may never have run:
# then the first install finds nothing and the lists are fetched.
host_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 && return 0
  log "apt-get update (host)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# The chroot's apt follows the host's choices on stale-mirror checks (some
# machines serve the archive from a snapshot whose Release has expired).
host_apt_options() {
  local key value
  for key in Acquire::Check-Valid-Until Acquire::Check-Date; do
    value=$(apt-config dump "$key" 2>/dev/null | sed -n "s/^$key \"\\(.*\\)\";\$/\\1/p")
    [ -z "$value" ] || printf '%s "%s";\n' "$key" "$value"
  done
}

installed() {
  [ -x "$R/usr/lib/rabbitmq/bin/rabbitmq-server" ] && [ -x "$R/usr/bin/dpkg-query" ] &&
    [ "$(cr dpkg-query -W -f='${db:Status-Status}' rabbitmq-server 2>/dev/null)" = installed ]
}

mount_proc() {
  # The node needs /proc for its whole life (vm_memory_monitor crashes
  # without it), and so do some maintainer scripts.
  mountpoint -q "$R/proc" || mount -t proc proc "$R/proc"
}

# The rabbitmq user's uid, as the host's kernel sees the node's processes: one
# no host user or group has, so no host account can reach the node's files.
free_uid() {
  local uid=${RMQ4_UID:-990}
  if [ -z "${RMQ4_UID:-}" ]; then
    while getent passwd "$uid" >/dev/null || getent group "$uid" >/dev/null; do
      uid=$((uid - 1))
      [ "$uid" -ge 900 ] || die "no free uid in 900..990 for the chroot's rabbitmq user; set RMQ4_UID"
    done
  fi
  echo "$uid"
}

build() {
  log "building the chroot in $R (Debian $SUITE; first time only)"
  command -v debootstrap >/dev/null || host_install debootstrap
  # A bootstrap that did not finish leaves $R/debootstrap behind; running
  # debootstrap again over it completes it.
  if [ ! -x "$R/usr/bin/apt-get" ] || [ -e "$R/debootstrap" ]; then
    local script=()
    # An older debootstrap without a trixie script bootstraps it as sid.
    [ -e "/usr/share/debootstrap/scripts/$SUITE" ] || script=(/usr/share/debootstrap/scripts/sid)
    mkdir -p "$R"
    debootstrap --variant=minbase "$SUITE" "$R" "$MIRROR" "${script[@]}" >/dev/null ||
      die "debootstrap failed (see $R/debootstrap/debootstrap.log)"
  fi
  # Name resolution for apt in the chroot, and no service starts from
  # maintainer scripts (the node is started below, by hand).
  rm -f "$R/etc/resolv.conf"
  cp -L /etc/resolv.conf "$R/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"
  chmod +x "$R/usr/sbin/policy-rc.d"
  host_apt_options >"$R/etc/apt/apt.conf.d/99idemq-ci"
  mount_proc
  if ! cr getent passwd rabbitmq >/dev/null; then
    local uid
    uid=$(free_uid)
    cr getent group rabbitmq >/dev/null || cr groupadd --system --gid "$uid" rabbitmq
    cr useradd --system --uid "$uid" --gid rabbitmq --home-dir /var/lib/rabbitmq \
      --no-create-home --shell /usr/sbin/nologin rabbitmq
  fi
  # apt's chatter goes to a log, shown if it fails. (Without /dev/pts in the
  # chroot, apt says "E: Can not write log (Is /dev/pts mounted?)": harmless.)
  local apt_log=$R/var/log/ci-apt.log
  if ! { cr apt-get update -q && cr apt-get install -y -q --no-install-recommends rabbitmq-server &&
    cr apt-get clean; } >"$apt_log" 2>&1; then
    tail -n 40 "$apt_log" >&2
    die "installing rabbitmq-server in $R failed (log: $apt_log)"
  fi
  installed || die "rabbitmq-server did not install in $R"
}

# Writes $2 to the chroot's file $1 unless it already holds exactly that.
put() {
  if [ "$(cat "$R$1" 2>/dev/null)" != "$2" ]; then printf '%s\n' "$2" >"$R$1"; fi
  cr chown rabbitmq:rabbitmq "$1"
}

configure() {
  put /etc/rabbitmq/rabbitmq-env.conf "NODENAME=$NODE
NODE_IP_ADDRESS=127.0.0.1
NODE_PORT=$PORT
DIST_PORT=$DIST_PORT
SERVER_ADDITIONAL_ERL_ARGS=\"-kernel inet_dist_use_interface {127,0,0,1}\""
  # loopback_users.guest = true is RabbitMQ's default: guest/guest works from
  # 127.0.0.1 only. Said here so that it stays so.
  put /etc/rabbitmq/rabbitmq.conf "listeners.tcp.default = 127.0.0.1:$PORT
loopback_users.guest = true"
}

# The OS pid of this chroot's node, if it runs (its pid file may be left over
# from a node that was killed).
node_pid() {
  local pid
  pid=$(cat "$R$PIDFILE" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && [ "$(readlink "/proc/$pid/root")" = "$R" ] &&
    echo "$pid"
}

show_logs() {
  local f
  for f in "$R$LOGDIR/ci-start.log" "$R$LOGDIR/$NODE.log"; do
    [ -f "$f" ] || continue
    printf -- '--- %s (last lines)\n' "$f" >&2
    tail -n 40 "$f" >&2
  done
}

start() {
  mount_proc
  if cr rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    log "$NODE already runs"
  else
    if ! node_pid >/dev/null; then
      rm -f "$R$PIDFILE"
      log "starting $NODE on 127.0.0.1:$PORT"
      mkdir -p "$R$LOGDIR"
      # Detached (its own session, no stdio of ours), so it outlives this
      # script and holds no pipe of the caller's open.
      (
        cd /
        exec setsid chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
          LANG=C.UTF-8 LC_ALL=C.UTF-8 /usr/sbin/rabbitmq-server \
          </dev/null >>"$R$LOGDIR/ci-start.log" 2>&1
      ) &
    else
      log "$NODE is starting already"
    fi
    if ! cr rabbitmq-diagnostics -q wait --timeout 120 "$PIDFILE" >/dev/null 2>&1; then
      show_logs
      die "$NODE did not start"
    fi
  fi
  if ! cr rabbitmq-diagnostics -q check_port_listener "$PORT" >/dev/null 2>&1 ||
    ! cr rabbitmqctl -q authenticate_user guest guest >/dev/null 2>&1; then
    show_logs
    die "$NODE runs but does not take guest/guest on 127.0.0.1:$PORT"
  fi
  log "RabbitMQ $(cr rabbitmq-diagnostics -q server_version) answers on 127.0.0.1:$PORT"
}

installed || build
configure
start
