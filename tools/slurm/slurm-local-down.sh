#!/usr/bin/env bash
# slurm-local-down.sh - stop the daemons that tools/slurm/slurm-local-up.sh started,
# and nothing else. Idempotent; a no-op when nothing was started.
#
# Reads $STATE/<name>.pid, checks that the pid still belongs to a process with
# that name (guards against pid reuse), sends SIGTERM, waits (bounded), then
# SIGKILL. Jobs still in the queue are cancelled first: stopping slurmd does not
# stop running jobs, whose slurmstepd processes would otherwise live on.
#   --slurm-only : leave munged running (used by slurm-local-up.sh on a config change)
set -uo pipefail

STATE=${SLURM_LOCAL_STATE:-/run/slurm-local}
log() { echo "[slurm-local-down] $*" >&2; }
rc=0

stop_one() {  # stop_one NAME (comm of the process, also the pid file's name)
    local name=$1 f="$STATE/$1.pid" pid
    [ -s "$f" ] || return 0
    pid=$(cat "$f")
    if [ ! -r "/proc/$pid/comm" ] || [ "$(cat "/proc/$pid/comm")" != "$name" ]; then
        log "$name (pid $pid) is no longer running"; rm -f "$f"; return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 50); do            # up to 10 s
        [ -d "/proc/$pid" ] || { rm -f "$f"; return 0; }
        sleep 0.2
    done
    log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null; sleep 0.5
    [ -d "/proc/$pid" ] && { log "ERROR: $name (pid $pid) is still alive"; rc=1; return 1; }
    rm -f "$f"
}

# cancel whatever is still queued or running on our cluster (bounded)
if [ -s "$STATE/slurmctld.pid" ] && command -v squeue >/dev/null &&
   timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(timeout 5 squeue -h -o %i 2>/dev/null | tr '\n' ' ')
    if [ -n "${jobs// /}" ]; then
        log "cancelling jobs: $jobs"
        # shellcheck disable=SC2086  # one argument per job id
        timeout 5 scancel $jobs 2>/dev/null
        for _ in $(seq 1 75); do        # up to 15 s
            [ -z "$(timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

stop_one slurmd
stop_one slurmctld
[ "${1:-}" = --slurm-only ] || stop_one munged
exit $rc
