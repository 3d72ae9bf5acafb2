#!/usr/bin/env bash
# `make slurm-up`: a single-node Slurm cluster on this machine (munged, slurmctld, slurmd; partition `debug`).
# Installs Debian's packages when missing, renders scripts/slurm/slurm.conf.in into /etc/slurm/slurm.conf and starts
# the daemons directly (no systemd). Idempotent: daemons already running with the same config are left alone; a changed
# config restarts them. Needs root (or sudo). Stop everything with `make slurm-down` (scripts/slurm/down.sh).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
CONF_DIR=/etc/slurm
STATE_DIR=/var/spool/slurm-purifybench
RUN_DIR=/run/slurm-purifybench
LOG_DIR=/var/log/slurm

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v squeue >/dev/null; then
  echo "slurm-up: installing slurmctld slurmd munge slurm-client (apt-get)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: the key comes with the package (created at install); the socket directory is not there without systemd.
$SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
$SUDO chown munge:munge /run/munge /var/log/munge /var/lib/munge
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mungekey --create --force 2>/dev/null || $SUDO /usr/sbin/create-munge-key -f
  $SUDO chown munge:munge /etc/munge/munge.key && $SUDO chmod 400 /etc/munge/munge.key
fi
if ! alive /run/munge/munged.pid; then
  $SUDO runuser -u munge -- /usr/sbin/munged
  echo "slurm-up: munged started (pid $(cat /run/munge/munged.pid))"
fi
munge -n | unmunge >/dev/null || { echo "slurm-up: munge does not round-trip a credential" >&2; exit 1; }

# The config, for this host: its short name, an address it resolves to, and what slurmd -C measures.
HOST="$(hostname -s)"
ADDR="$(getent hosts "$HOST" | awk '{print $1; exit}')"; ADDR="${ADDR:-127.0.0.1}"
NODE_HW="$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore|RealMemory)=' | tr '\n' ' ')"
[ -n "$NODE_HW" ] || { echo "slurm-up: slurmd -C printed nothing usable" >&2; exit 1; }
$SUDO mkdir -p "$CONF_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$RUN_DIR" "$LOG_DIR"
NEW="$(mktemp)"; trap 'rm -f "$NEW"' EXIT
sed -e "s|@HOST@|$HOST|g" -e "s|@ADDR@|$ADDR|g" -e "s|@NODE_HW@|${NODE_HW% }|g" -e "s|@STATE_DIR@|$STATE_DIR|g" \
    -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@LOG_DIR@|$LOG_DIR|g" "$HERE/slurm.conf.in" > "$NEW"
CHANGED=0
if ! cmp -s "$NEW" "$CONF_DIR/slurm.conf"; then
  $SUDO install -m 644 "$NEW" "$CONF_DIR/slurm.conf"; CHANGED=1
  echo "slurm-up: wrote $CONF_DIR/slurm.conf ($HOST, ${NODE_HW% })"
fi

stop() {  # pid file → that process only
  if alive "$1"; then $SUDO kill "$(cat "$1")"; for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done; fi
}
if [ "$CHANGED" = 1 ]; then stop "$RUN_DIR/slurmd.pid"; stop "$RUN_DIR/slurmctld.pid"; fi
if ! alive "$RUN_DIR/slurmctld.pid"; then
  $SUDO slurmctld && echo "slurm-up: slurmctld started"
fi
for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
scontrol ping | grep -q UP || { echo "slurm-up: slurmctld does not answer; see $LOG_DIR/slurmctld.log" >&2; tail -20 "$LOG_DIR/slurmctld.log" >&2; exit 1; }
if ! alive "$RUN_DIR/slurmd.pid"; then
  $SUDO slurmd && echo "slurm-up: slurmd started"
fi

# The node registers within seconds; a node left down or drained by an earlier run is resumed.
state=""
for _ in $(seq 60); do
  state="$(sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -1)"
  case "$state" in
    idle*|mixed*|allocated*|completing*) break ;;
    down*|drain*|fail*) $SUDO scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.5
done
case "$state" in
  idle*|mixed*|allocated*|completing*) ;;
  *) echo "slurm-up: node $HOST is '$state', not usable; see $LOG_DIR/slurmd.log" >&2; tail -20 "$LOG_DIR/slurmd.log" >&2; exit 1 ;;
esac
sinfo
