#!/usr/bin/env bash
# `make slurm-down`: stop what scripts/slurm/up.sh started (slurmd, slurmctld, munged), by their pid files.
# Jobs still queued or running are cancelled first. Packages, config and state stay (`make slurm-up` restarts).
set -uo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
RUN_DIR=/run/slurm-purifybench
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {
  if alive "$1"; then
    $SUDO kill "$(cat "$1")"
    for _ in $(seq 50); do alive "$1" || break; sleep 0.2; done
    echo "slurm-down: stopped $2"
  fi
}
if alive "$RUN_DIR/slurmctld.pid"; then
  ids="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')"
  [ -z "${ids// }" ] || { $SUDO scancel $ids 2>/dev/null; echo "slurm-down: cancelled jobs $ids"; }
fi
stop "$RUN_DIR/slurmd.pid" slurmd
stop "$RUN_DIR/slurmctld.pid" slurmctld
stop /run/munge/munged.pid munged
exit 0
