#!/usr/bin/env bash
# submit.sh - run any model script of this repo as a SLURM job that survives
# time limits and preemption: it checkpoints, requeues and resumes by itself.
#
#   sbatch submit.sh <script> [script args...]   runs   python <script>.py --resume [script args...]
#
# Examples (from the repo root; logs go to logs/<job name>-<job id>.out):
#   mkdir -p logs                                         # Slurm cannot create the log folder itself
#   sbatch submit.sh wgan_gp --steps 100000
#   sbatch -J ddpm submit.sh ddpm                          # -J names the job, see "Job name" below
#   sbatch --time=4:00:00 --gres=gpu:a100:1 submit.sh ddpm # options given to sbatch override the
#   sbatch -p long --mem=64G -c 16 submit.sh cyclegan      #   #SBATCH lines below, one by one
#   GPUS=4 sbatch --gres=gpu:4 -c 32 --mem=128G submit.sh ddpm   # DDP: torchrun --standalone --nproc_per_node=4
#   GPUS=8 sbatch --nodes=4 --gres=gpu:8 -c 64 submit.sh ddpm     # 4 nodes x 8 GPUs: srun, one torchrun per node
#   VENV=~/venvs/gen sbatch submit.sh dcgan                # activate this venv in the job first
#   MODULES="cuda/12.4 python/3.11" sbatch submit.sh vae   # `module load` these first
#   DRY_RUN=1 bash submit.sh ddpm --steps 10               # check the name, print the command, run nothing
#   bash submit.sh gan --steps 500                         # without SLURM: same run, no requeue
#
# Variables, read from the environment that sbatch passes on (sbatch exports your
# whole environment unless the site sets --export=NONE; then use
# `sbatch --export=ALL,GPUS=4 ...`):
#   GPUS=N      launch with torchrun on N GPUs of one node (only scripts whose
#               docstring shows a torchrun command support DDP); also ask Slurm for
#               them with --gres=gpu:N. Default 1: plain python. With --nodes=K,
#               N GPUs on each node: K*N processes share the global batch.
#   RDZV_PORT=P more than one node: the port of torchrun's rendezvous on the first
#               node (default 20000 + job id % 10000).
#   MULTINODE=1 the launch of more than one node (srun, one torchrun per node, c10d
#               rendezvous) on one node too: to try it before asking for more nodes.
#   VENV=DIR    `source DIR/bin/activate` before running. Not needed when the venv or
#               conda env is already active in the shell you run sbatch from: the job
#               inherits its PATH.
#   MODULES=".." `module load ..` before running (environment modules / Lmod).
#   REPO_DIR    where the model scripts are (default: $SLURM_SUBMIT_DIR, the folder
#               sbatch was run from; Slurm runs a copy of this file, so its own
#               path says nothing).
#   DRY_RUN=1   stop after printing the command.
# Relative paths (--out runs/..., logs/) are relative to the job's working
# directory: the folder sbatch was run from, or --chdir.
#
# How a run ends:
#   - all steps done: the script writes its checkpoint and exits 0; the job is
#     COMPLETED and never requeued. A requeued run of a finished job prints
#     "already done" and exits 0 at once.
#   - time limit: Slurm never requeues a job that reaches its limit (it ends in
#     TIMEOUT), so --signal=B:USR1@300 asks Slurm to send USR1 to this shell about
#     5 minutes earlier (Slurm may send it up to 60 s earlier still; raise the
#     lead if a step plus a checkpoint can take longer). Without "B:" Slurm would
#     signal only job steps started with srun, and nothing here. This shell
#     passes USR1 on to python (once python has installed its handler, so that a
#     USR1 during its start cannot kill it), which finishes its step, saves
#     ckpt.pt and exits 0; then this shell requeues the job (scontrol requeue).
#     Slurm starts it again later, --resume continues from the checkpoint, and
#     SLURM_RESTART_COUNT counts up.
#   - preemption, `scontrol requeue` from outside, `scancel`: Slurm sends SIGTERM
#     to every process of the job. Python saves its checkpoint and exits; Slurm
#     requeues the job by itself when it was preempted or requeued, so this shell
#     must not requeue it again (that would be a second requeue). After
#     KillWait seconds (often 30) Slurm sends SIGKILL.
#   - the trainer fails (bad argument, NaN, run folder in use by another job):
#     its exit status becomes the job's, FAILED, no requeue.
#   - USR1 before the trainer's first step (still loading data): it exits 3 with
#     nothing new to save, and the job is not requeued: a job that makes no
#     progress between two requeues would otherwise requeue forever.
#   - --resume PATH in the arguments: PATH starts --out only while --out has no
#     checkpoint of its own; every requeue after that continues --out's.
#
# More than one node (sbatch --nodes=K): this shell runs on the first node only.
# It starts `srun`, which runs one torchrun per node; their c10d rendezvous is on
# the first node. USR1 goes to the workers of the first node only: srun's task
# there writes its pid (torchrun's) to a file, since they are no children of this
# shell. The scripts' ranks agree on a stop every 10 steps, so a stop that reaches
# any rank stops all of them at the same step, and rank 0 alone writes the
# checkpoint. torchrun ignores USR1 on every node (no USR1 handler of its own: it
# would die and orphan its workers), in case a USR1 reaches the whole job step
# (`scancel --signal=USR1 <job>`; srun forwards any signal it gets to every
# process of the step). SIGTERM reaches every process on every node from Slurm
# (torchrun passes it to its workers and waits for them). --kill-on-bad-exit
# ends every node when one fails; the workers exit 0 after a checkpoint, so do
# torchrun and srun. torchrun reports a worker's exit 3 as 1: not requeued either.
#
# Job name: #SBATCH lines are read by sbatch before anything runs, so they cannot
# compute a name from the arguments. Pass -J <script> to name the job and its log.
# Without -J, the job is called "submit.sh" at submission; this script then
# renames it to the model (scontrol update) so that squeue shows which model
# runs. Its log file keeps the name it was given at submission
# (logs/submit.sh-<id>.out, also after requeues), although `scontrol show job`
# displays StdOut with the new name; the first lines of the log print its real path.
#
# Defaults for one GPU job; each can be overridden on the sbatch command line.
#SBATCH --nodes=1                 # torchrun --standalone: one node, GPUS processes
#SBATCH --ntasks-per-node=1       # one batch shell; --nodes=K: one torchrun per node (--ntasks=1
                                  #   would make Slurm shrink --nodes=K to one node)
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8         # data loading and the python process
#SBATCH --mem=32G
#SBATCH --time=24:00:00           # any length works: the job requeues itself before it
#SBATCH --signal=B:USR1@300       # 5 min to finish a step and save; B: signal this batch shell
#SBATCH --requeue                 # let the job be requeued: by this script and on preemption
#SBATCH --open-mode=append        # a requeued run appends to the log instead of truncating it
#SBATCH --output=logs/%x-%j.out   # %x job name, %j job id; logs/ must exist

# ---- 1. signal traps, before anything else ----------------------------------
# USR1's default action is to terminate the process: a USR1 that arrived before
# this trap would kill the job with no checkpoint. Bash runs a trap only between
# commands, which is why python runs in the background and this shell `wait`s.
# No $(...) below this point: bash 5.2 loses a trapped signal that arrives while
# it expands some command substitutions (measured: "$(date) $(hostname)" lost
# 14 USR1 out of 20, with "trap: unexpected EOF while looking for matching `)'").
child=""            # pid of python (or torchrun, or srun)
got_usr1=0          # the time limit is near: requeue once python has checkpointed
got_stop=0          # preempted, requeued from outside or cancelled: Slurm decides
pending_usr1=0      # USR1 came before python was started: pass it on after the start
multinode=0         # srun runs one torchrun per node (section 2)
pidfile=""          # with multinode: where srun's task on this node writes torchrun's pid
# `cmd | mapfile -t array` runs mapfile in this shell: the way to read a command's
# output here, as <(...) loses a trapped signal too (measured: 1 USR1 in 95).
shopt -s lastpipe

say() { printf '[submit.sh] %(%F %T)T %s\n' -1 "$*"; }
say_n() { printf '[submit.sh] %(%F %T)T %s' -1 "$*"; }     # the command after it ends the line

# usr1_ready PID -> 0: PID has a USR1 handler (bit 10 of SigCgt in /proc/PID/status),
# 1: not yet (not yet python, still importing torch, or exiting), 2: PID has exited.
usr1_ready() {
    local key value state=Z mask=0
    [ -r "/proc/$1/status" ] || return 2
    while read -r key value _; do
        case $key in State:) state=$value ;; SigCgt:) mask=$value ;; esac
    done 2>/dev/null < "/proc/$1/status"
    [ "$state" != Z ] || return 2
    # Right after the fork, before it execs python, the child is a copy of this
    # shell and shows this shell's USR1 trap: a USR1 sent then would be lost.
    if [ "/proc/$1/exe" -ef "/proc/$$/exe" ]; then return 1; fi
    (( (16#$mask >> 9) & 1 )) || return 1
}
# send_usr1 PID: send USR1 once PID catches it, so that python checkpoints instead
# of dying (a USR1 during its start or its exit would kill it); fails if PID exits
# first, e.g. a run that has just finished by itself, which must not be requeued.
send_usr1() {
    local rc i
    for ((i = 0; i < 600; i++)); do     # up to 2 minutes
        rc=0; usr1_ready "$1" || rc=$?
        # "return $?", not "return": in a trap handler a bare return gives the
        # status of the command the trap interrupted (wait's 138), not kill's.
        case $rc in
            0) kill -USR1 "$1" 2>/dev/null; return $? ;;
            2) return 1 ;;
        esac
        sleep 0.2
    done
    kill -USR1 "$1" 2>/dev/null         # no handler after 2 minutes: send it anyway
}

# shellcheck disable=SC2317  # trap handlers are called indirectly
on_usr1() {
    say "got USR1 (time limit near): asking the trainer to save a checkpoint"
    if [ -n "$child" ]; then pass_usr1; else pending_usr1=1; fi
}
pass_usr1() {
    local pid launcher=$child targets=("$child")
    if [ "$multinode" = 1 ]; then
        if ! node_launcher; then
            # Task 0 is not on this node, or this step sees another /tmp: srun
            # passes USR1 to every process of its step on every node (torchrun
            # ignores it; a worker without its handler yet ignores it too).
            say "torchrun of this node not found in $pidfile: passing USR1 to srun, for every process of the step"
            if kill -USR1 "$child" 2>/dev/null; then got_usr1=1; fi
            return 0
        fi
    fi
    if [ "$GPUS" -gt 1 ] || [ "$multinode" = 1 ]; then
        # torchrun has no USR1 handler, so USR1 would kill it and orphan its
        # workers: signal the workers, its children, instead.
        workers "$launcher"
    fi
    for pid in "${targets[@]}"; do
        if send_usr1 "$pid"; then got_usr1=1; fi
    done
    [ "$got_usr1" = 1 ] || say "the trainer has ended by itself or not started its workers: nothing to signal"
}
# workers PID: PID's children (torchrun's workers) into `targets`, once PID has
# started all GPUS of them (it may still be in the rendezvous, waiting for the
# other nodes); up to 2 minutes, less if PID exits.
workers() {
    local i
    targets=()
    for ((i = 0; i < 600; i++)); do
        kill -0 "$1" 2>/dev/null || return 0
        # Not while PID is still a shell (before its exec, or a pyenv shim):
        # its children then are no workers.
        if ! [ "/proc/$1/exe" -ef "/proc/$$/exe" ]; then
            pgrep -P "$1" | mapfile -t targets || true
            [ "${#targets[@]}" -lt "$GPUS" ] || return 0
        fi
        sleep 0.2
    done
}
# node_launcher: the pid of this node's torchrun, into `launcher`. Under srun it
# is no descendant of this shell: srun's task 0, on this first node, writes it to
# $pidfile. Waits up to 2 minutes while srun runs (it may still start the tasks).
node_launcher() {
    local i
    for ((i = 0; i < 600; i++)); do
        if [ -s "$pidfile" ] && read -r launcher < "$pidfile"; then return 0; fi
        kill -0 "$child" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}
# shellcheck disable=SC2317
on_stop() {
    got_stop=1
    say "got SIG$1 (preemption, requeue from outside, scancel, time limit or Ctrl-C): the trainer checkpoints, Slurm does the rest"
    # Not passed on: Slurm sends SIGTERM to every process of the job (a terminal
    # sends Ctrl-C's SIGINT to all of them too), python and torchrun included, and a
    # second SIGTERM makes torchrun abandon the graceful shutdown of its workers
    # (it stops waiting for their checkpoint).
}
trap on_usr1 USR1
trap 'on_stop TERM' TERM
trap 'on_stop INT' INT

set -euo pipefail

# ---- 2. which script --------------------------------------------------------
here=.                                  # this file's folder, when run without sbatch
if [[ $0 == */* ]]; then here=${0%/*}; fi
REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$here}}
MODELS="gan dcgan wgan wgan_gp cyclegan pix2pix vae realnvp ddpm"
available=""
for m in $MODELS; do [ -f "$REPO_DIR/$m.py" ] && available="$available $m"; done
name=${1:-}
name=${name%.py}
if [ -z "$name" ] || [[ " $available " != *" $name "* ]]; then
    echo "submit.sh: unknown script '${1:-}'; the scripts in $REPO_DIR are:${available:- none}" >&2
    echo "usage: sbatch submit.sh <script> [script args...]   (run sbatch from the repo, or set REPO_DIR)" >&2
    exit 2
fi
shift
script=$REPO_DIR/$name.py

GPUS=${GPUS:-1}
[[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || { echo "submit.sh: GPUS must be a positive integer, not '$GPUS'" >&2; exit 2; }
nodes=${SLURM_NNODES:-1}
if [ "$nodes" -gt 1 ] || [ "${MULTINODE:-0}" = 1 ]; then multinode=1; fi
if [ "$GPUS" -gt 1 ] || [ "$multinode" = 1 ]; then
    grep -q torchrun "$script" || {
        echo "submit.sh: $name.py does not support DDP (its docstring shows no torchrun command); run it on one node with GPUS=1" >&2
        exit 2; }
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        IFS=, read -ra visible <<< "$CUDA_VISIBLE_DEVICES"
        [ "${#visible[@]}" -ge "$GPUS" ] || {
            echo "submit.sh: GPUS=$GPUS but this job sees ${#visible[@]} GPU(s) (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); submit with --gres=gpu:$GPUS" >&2
            exit 2; }
    fi
fi
if [ "$multinode" = 1 ]; then
    [ -n "${SLURM_JOB_ID:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ] || {
        echo "submit.sh: more than one node (or MULTINODE=1) needs a Slurm job: sbatch --nodes=K submit.sh $name ..." >&2
        exit 2; }
    # The rendezvous is on the first node: the one this shell runs on.
    scontrol show hostnames "$SLURM_JOB_NODELIST" | mapfile -t hosts || hosts=()
    [ "${#hosts[@]}" -gt 0 ] || {
        echo "submit.sh: 'scontrol show hostnames $SLURM_JOB_NODELIST' names no node" >&2; exit 2; }
    port=${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}   # below the ephemeral ports
    pidfile=${TMPDIR:-/tmp}/submit.sh-$SLURM_JOB_ID.pid
    # srun's task on each node: ignore USR1 (see "More than one node" at the top;
    # the workers inherit this until they install their handler), let task 0 (on
    # this node) tell pass_usr1 its pid, and become torchrun (exec keeps the pid).
    # shellcheck disable=SC2016  # expanded by the task's bash
    per_node='trap "" USR1; if [ "$SLURM_PROCID" = 0 ]; then echo $$ > "$1.tmp" && mv -f "$1.tmp" "$1"; fi; shift; exec "$@"'
    # --ntasks too: the job's SLURM_NTASKS would count any --ntasks-per-node given
    # to sbatch; --cpus-per-task: srun of Slurm 22.05 does not inherit it;
    # --export=ALL: this environment (venv, modules), also where sbatch had NONE.
    cmd=(srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL
         ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"}
         bash -c "$per_node" submit.sh-node "$pidfile"
         torchrun --nnodes="$nodes" --nproc_per_node="$GPUS" --rdzv_backend=c10d
         --rdzv_endpoint="${hosts[0]}:$port" --rdzv_id="$SLURM_JOB_ID" "$script" --resume "$@")
elif [ "$GPUS" -gt 1 ]; then
    cmd=(torchrun --standalone --nproc_per_node="$GPUS" "$script" --resume "$@")
else
    cmd=(python -u "$script" --resume "$@")
fi
export PYTHONUNBUFFERED=1               # log lines appear live, torchrun's workers' too
# Without CPU binding, torch would start one thread per core of the whole node in
# every process; give each process its share of the job's CPUs instead.
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / GPUS > 0 ? SLURM_CPUS_PER_TASK / GPUS : 1 ))
fi

# Without -J the job is named after this file; name it after the model (see top).
if [ -n "${SLURM_JOB_ID:-}" ] && [[ "${SLURM_JOB_NAME:-}" == *.sh ]]; then
    scontrol update JobId="$SLURM_JOB_ID" JobName="$name" 2>/dev/null || true
fi

# ---- 3. environment ---------------------------------------------------------
if [ -n "${MODULES:-}" ]; then
    set +u                              # init and activate scripts may read unset variables
    for init in /etc/profile.d/lmod.sh /etc/profile.d/modules.sh; do   # a batch shell is no login shell
        if ! type module >/dev/null 2>&1 && [ -f "$init" ]; then
            # shellcheck source=/dev/null
            source "$init"
        fi
    done
    set -u
    type module >/dev/null 2>&1 || { echo "submit.sh: MODULES is set but there is no 'module' command" >&2; exit 2; }
    # shellcheck disable=SC2086  # word splitting intended: a list of modules
    module load $MODULES
fi
if [ -n "${VENV:-}" ]; then
    [ -f "$VENV/bin/activate" ] || { echo "submit.sh: VENV=$VENV has no bin/activate" >&2; exit 2; }
    set +u
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
    set -u
fi

# What a later reader of the log needs to reproduce or debug this run.
say "job ${SLURM_JOB_ID:-none (not under SLURM)} ($name) on $HOSTNAME, SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}"
say_n "gpu: CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset} "
if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | paste -sd ';' - || echo
else
    echo "(no nvidia-smi)"
fi
say_n "repo: $REPO_DIR at commit "
if git -C "$REPO_DIR" log -1 --format='%h (%cd)' --date=short 2>/dev/null; then
    git -C "$REPO_DIR" diff --quiet HEAD -- 2>/dev/null || say "repo: with uncommitted changes to tracked files"
else
    echo "unknown (not a git checkout, or git refuses it)"
fi
say_n "python: "
python -c 'import sys; print(sys.executable, sys.version.split()[0])'
say "cwd: $PWD; OMP_NUM_THREADS=${OMP_NUM_THREADS:-unset}"
if [ "$multinode" = 1 ]; then
    say "nodes: $nodes ($SLURM_JOB_NODELIST), $GPUS process(es) each; rendezvous on ${hosts[0]}:$port"
fi
say_n "log: "
readlink /proc/$$/fd/1 || echo "?"
printf -v line '%q ' "${cmd[@]}"
if [ "$multinode" = 1 ]; then                    # the per-node script in '...', readable
    printf -v quoted '%q' "$per_node"
    readable=${per_node@Q}
    line=${line/"$quoted"/"$readable"}           # quoted: bash 5.2 reads & in it as the match
fi
say "run: ${line% }"

if [ "${DRY_RUN:-0}" = 1 ]; then exit 0; fi
if [ "$got_stop" = 1 ]; then say "stop signal before the start: not starting"; exit 143; fi

# ---- 4. run and wait ----------------------------------------------------------
if [ "$multinode" = 1 ]; then rm -f "$pidfile"; fi   # a requeued job has the same id
"${cmd[@]}" &
child=$!
if [ "$pending_usr1" = 1 ]; then pass_usr1; fi
# `wait` returns (status > 128) as soon as a trapped signal arrives, while the
# child goes on writing its checkpoint: wait again until it is really gone. Bash
# keeps the status of an exited child, so the last `wait` returns it.
while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
rc=0; wait "$child" || rc=$?
if [ "$multinode" = 1 ]; then rm -f "$pidfile"; fi

# ---- 5. requeue or not ------------------------------------------------------
if [ "$got_stop" = 1 ]; then
    say "trainer exited with status $rc after a stop signal; Slurm requeues the job if it was preempted or requeued"
    exit "$rc"
fi
if [ "$got_usr1" = 1 ]; then
    # 138 = killed by USR1: python was exiting just as it came (send_usr1 leaves
    # only a moment for that); its last checkpoint is intact, so go on as usual.
    # 3 = stopped before its first step (common.EXIT_NO_PROGRESS): a requeue would
    # most likely stop at the same place again, so the job ends instead of looping.
    if [ "$rc" = 3 ]; then
        say "the trainer made no progress in this job (no step since it started): not requeueing; submit it again once the cause is fixed"
        exit "$rc"
    fi
    if [ "$rc" != 0 ] && [ "$rc" != 138 ]; then
        why=""                  # torchrun exits 1 for any failed worker, exit 3 included
        if [ "${cmd[0]}" != python ]; then why=" (a worker failed, or stopped before its first step)"; fi
        say "trainer exited with status $rc after USR1$why: not requeueing"
        exit "$rc"
    fi
    if [ -z "${SLURM_JOB_ID:-}" ]; then say "checkpoint saved; not under SLURM, nothing to requeue"; exit 0; fi
    say "checkpoint saved (status $rc); requeueing job $SLURM_JOB_ID to continue after the time limit"
    # Slurm now ends this run with SIGTERM, which needs no handling any more.
    trap '' TERM
    if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
    say "ERROR: scontrol requeue failed (submitted with --no-requeue?); the checkpoint is saved: submit the same command again to continue" >&2
    exit 1
fi
say "trainer exited with status $rc"
exit "$rc"
