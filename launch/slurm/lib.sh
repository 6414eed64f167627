# shellcheck shell=bash
# Shared logic of the sbatch scripts in launch/slurm/ (sourced, never run on its own).
#
# Owns: reading the job's settings (config, run directory, GPUs per node, extra overrides),
# finding the rendezvous host of an allocation, running the training command with signal
# forwarding, and requeueing a preempted job. It does not own what runs: each sbatch script
# builds its own command line (torchrun, srun + torchrun, srun + python).
#
# Every external command is a variable so tests (or unusual clusters) can substitute it:
#   PYTHON    python interpreter                      (default: python)
#   TORCHRUN  torchrun launcher                       (default: $PYTHON launch/slurm/torchrun_forward.py,
#             torchrun that passes SIGTERM/SIGUSR1 to its workers instead of shutting them down)
#   SRUN      Slurm's srun                            (default: srun)
#   SCONTROL  Slurm's scontrol                        (default: scontrol)
# These are split on spaces, so "python -m torch.distributed.run" works; paths with spaces do not.
#
# Settings read from the environment (all optional except the config):
#   CONFIG        YAML config (or the first argument of the sbatch script when it ends in .yaml/.yml)
#   REPO_DIR      repository root (default: the directory sbatch was called from)
#   TRAIN_SCRIPT  entry point (default: $REPO_DIR/launch/train.py)
#   RUN_NAME      run name (default: the job name given with -J, else the config's file stem)
#   RUNS_DIR      parent of run directories (default: $REPO_DIR/runs)
#   OUTPUT_DIR    run directory (default: $RUNS_DIR/$RUN_NAME; never the job id, so a requeued
#                 or resubmitted job finds its checkpoints)
#   RESUME        checkpoint.resume value (default: auto, the trainer's default: continue the run in
#                 OUTPUT_DIR; never: move a previous run there aside and start fresh; empty:
#                 start fresh, only in a directory without a run; or a checkpoint file)
#   GPUS          processes per node (default: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE, else
#                 the number of GPUs nvidia-smi lists, else 1)
#   CPU_PROCS     N CPU processes per node and no GPUs: hides every GPU (CUDA_VISIBLE_DEVICES=),
#                 so the processes train on CPU with gloo; submit with --gpus-per-node=0
#                 --cpus-per-task=C (cannot be combined with GPUS)
#   MAX_REQUEUES  stop requeueing after this many restarts of the job (default: 50)

slurm_log() {
  printf '[slurm %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2
}

slurm_die() {
  slurm_log "error: $*"
  exit 2
}

# Repository root (this file is launch/slurm/lib.sh), for the Python helpers below.
_SLURM_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# First host of a Slurm node list by the project's parser (dist_train/slurm_hosts.py, standard
# library only), used when scontrol is absent: "gpu[03-05,07],cpu1" -> gpu03;
# "a[1-2]-ib[3-4]" -> a1-ib3. A malformed list fails with a message naming it.
slurm_first_host_python() {
  # shellcheck disable=SC2086  # $PYTHON may hold several words (see the header)
  PYTHONPATH="$_SLURM_REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}" \
    ${PYTHON:-python} -m dist_train.slurm_hosts first "$1"
}

# First host of the allocation: scontrol's expansion when scontrol exists, else the Python parser.
slurm_first_host() {
  local list=${1:-${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}}
  local scontrol=${SCONTROL:-scontrol} hosts=()
  [[ -n $list ]] || slurm_die "no node list: SLURM_JOB_NODELIST is not set (run inside sbatch/salloc)"
  # shellcheck disable=SC2086  # command variables are split on purpose (see the header)
  if command -v ${scontrol%% *} >/dev/null 2>&1; then
    # mapfile instead of "| head -n1": no SIGPIPE for scontrol under pipefail
    mapfile -t hosts < <($scontrol show hostnames "$list" 2>/dev/null || true)
  fi
  if ((${#hosts[@]})) && [[ -n ${hosts[0]} ]]; then
    printf '%s\n' "${hosts[0]}"
  else
    slurm_first_host_python "$list"
  fi
}

# Port of the rendezvous / process-group store: MASTER_PORT if set, else derived from the job id
# (the same rule as dist_train.distributed.env_world_info), so two jobs sharing a node differ.
slurm_port() {
  if [[ -n ${MASTER_PORT:-} ]]; then
    printf '%s\n' "$MASTER_PORT"
  else
    printf '%s\n' $((20000 + ${SLURM_JOB_ID:-0} % 20000))
  fi
}

# Processes (GPUs) per node.
slurm_gpus_per_node() {
  local g=${GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
  g=${g##*:} # "a100:4" or "gpu:a100:4" -> 4
  if [[ -z $g ]] && command -v nvidia-smi >/dev/null 2>&1; then
    g=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ $g != 0 ]] || g=""
  fi
  g=${g:-1}
  [[ $g != 0 ]] || slurm_die "the job has no GPUs (0 per node); set CPU_PROCS=N to train with N CPU processes"
  [[ $g =~ ^[1-9][0-9]*$ ]] || slurm_die "cannot tell the GPUs per node from '$g'; set GPUS=N"
  printf '%s\n' "$g"
}

# Reads the settings and builds TRAIN_ARGS (the arguments after the entry script).
# Arguments: [CONFIG.yaml] [KEY=VALUE ...] (the sbatch script's own arguments).
slurm_setup() {
  REPO_DIR=$(cd "${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
  if [[ $# -gt 0 && ($1 == *.yaml || $1 == *.yml) ]]; then
    CONFIG=$1
    shift
  fi
  [[ -n ${CONFIG:-} ]] ||
    slurm_die "no config: pass it first (sbatch $0 launch/configs/NAME.yaml [key=value ...]) or set CONFIG"
  # Relative paths are relative to the submission directory, as the user typed them.
  [[ $CONFIG == /* ]] || CONFIG=${SLURM_SUBMIT_DIR:-$PWD}/$CONFIG
  [[ -f $CONFIG ]] || slurm_die "config file not found: $CONFIG"
  PYTHON=${PYTHON:-python}
  TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO_DIR/launch/train.py}
  [[ -f $TRAIN_SCRIPT ]] || slurm_die "entry script not found: $TRAIN_SCRIPT (set REPO_DIR?)"
  # torchrun in a process that passes SIGTERM/SIGUSR1 on to the workers (see torchrun_forward.py).
  TORCHRUN=${TORCHRUN:-$PYTHON $_SLURM_REPO_ROOT/launch/slurm/torchrun_forward.py}
  if [[ -n ${CPU_PROCS:-} ]]; then
    [[ $CPU_PROCS =~ ^[1-9][0-9]*$ ]] || slurm_die "CPU_PROCS='$CPU_PROCS' is not a process count"
    [[ -z ${GPUS:-} || ${GPUS} == "$CPU_PROCS" ]] ||
      slurm_die "CPU_PROCS=$CPU_PROCS and GPUS=$GPUS both set; CPU_PROCS means CPU processes, no GPUs"
    GPUS=$CPU_PROCS
    export CUDA_VISIBLE_DEVICES=""
    slurm_log "CPU_PROCS=$CPU_PROCS: $CPU_PROCS CPU processes per node, GPUs hidden"
  fi
  SRUN=${SRUN:-srun}
  SCONTROL=${SCONTROL:-scontrol}
  if [[ -z ${RUN_NAME:-} ]]; then
    # sbatch names a job after its script unless -J is given; that name says nothing about the run.
    RUN_NAME=${SLURM_JOB_NAME:-}
    if [[ -z $RUN_NAME || $RUN_NAME == *.sbatch || $RUN_NAME == *.sh ]]; then
      RUN_NAME=$(basename "$CONFIG")
      RUN_NAME=${RUN_NAME%.*}
    fi
  fi
  OUTPUT_DIR=${OUTPUT_DIR:-${RUNS_DIR:-$REPO_DIR/runs}/$RUN_NAME}
  TRAIN_ARGS=(--config "$CONFIG" --set "output_dir=$OUTPUT_DIR" --set "checkpoint.resume=${RESUME-auto}")
  local kv
  for kv in "$@"; do
    [[ $kv == *=* ]] || slurm_die "argument '$kv' is not a config override KEY=VALUE"
    TRAIN_ARGS+=(--set "$kv")
  done
  # Relative paths inside configs (data roots, eval targets) are relative to the repository.
  cd "$REPO_DIR" || slurm_die "cannot enter $REPO_DIR"
  mkdir -p "$OUTPUT_DIR"
  slurm_log "job ${SLURM_JOB_ID:-none} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-$(hostname)}: config $CONFIG, run directory $OUTPUT_DIR"
}

# Threads per process when the user did not choose: the task's CPUs shared by its processes.
slurm_default_threads() {
  local procs=$1
  if [[ -z ${OMP_NUM_THREADS:-} && -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export OMP_NUM_THREADS=$((SLURM_CPUS_PER_TASK / procs > 0 ? SLURM_CPUS_PER_TASK / procs : 1))
  fi
}

_SLURM_CHILD=""
_SLURM_STOP_SIG=""
_SLURM_FWD_SIG=TERM
_SLURM_FORWARDED=0
# From the moment this file is sourced, a USR1/TERM is remembered instead of killing the shell,
# so a signal that arrives while the job is still setting up still leads to a requeue.
trap '_slurm_on_signal USR1' USR1
trap '_slurm_on_signal TERM' TERM

_slurm_forward() {
  if [[ -n $_SLURM_CHILD && $_SLURM_FORWARDED == 0 ]]; then
    _SLURM_FORWARDED=1
    kill -s "$_SLURM_FWD_SIG" "$_SLURM_CHILD" 2>/dev/null || true
  fi
}

_slurm_on_signal() {
  if [[ -z $_SLURM_STOP_SIG ]]; then
    _SLURM_STOP_SIG=$1
    if [[ -n $_SLURM_CHILD ]]; then
      slurm_log "got SIG$1: asking the training processes (pid $_SLURM_CHILD) to checkpoint and exit (SIG$_SLURM_FWD_SIG)"
    else
      slurm_log "got SIG$1 before the training started"
    fi
  fi
  # Forward once: a second TERM to torchrun while it shuts its workers down would cut that short.
  _slurm_forward
}

# Runs "$@" in the background; USR1 or TERM to this shell is forwarded ONCE to it as signal $1.
# Waits for it to exit and sets SLURM_CHILD_RC and SLURM_STOP_SIGNAL ("" when no signal came).
slurm_run_forwarding() {
  _SLURM_FWD_SIG=$1
  shift
  _SLURM_FORWARDED=0
  _SLURM_CHILD=""
  # Traps first: a signal arriving before the child exists is remembered and forwarded below.
  trap '_slurm_on_signal USR1' USR1
  trap '_slurm_on_signal TERM' TERM
  "$@" &
  _SLURM_CHILD=$!
  [[ -z $_SLURM_STOP_SIG ]] || _slurm_forward
  local rc=0
  wait "$_SLURM_CHILD" || rc=$?
  # wait returns 128+n when a trapped signal interrupts it; the child is still running then.
  while ((rc > 128)) && kill -0 "$_SLURM_CHILD" 2>/dev/null; do
    rc=0
    wait "$_SLURM_CHILD" || rc=$?
  done
  trap - USR1 TERM
  SLURM_CHILD_RC=$rc
  SLURM_STOP_SIGNAL=$_SLURM_STOP_SIG
}

# One field of "scontrol show job" for this job ("" when scontrol cannot tell).
slurm_job_field() {
  local out kv
  # shellcheck disable=SC2086
  out=$($SCONTROL -o show job "$SLURM_JOB_ID" 2>/dev/null) || return 0
  for kv in $out; do
    if [[ $kv == "$1="* ]]; then
      printf '%s\n' "${kv#*=}"
      return 0
    fi
  done
}

# Runs the training command with forwarding; after a stop signal says what happened and requeues
# the job when Slurm is not already ending or requeueing it. Arguments: the signal to forward,
# then the command. Exits the script.
#
# The job's state (scontrol show job) tells the cases apart:
#   Restarts above this run's SLURM_RESTART_COUNT: Slurm requeued the job itself (scontrol
#     requeue, preemption with PreemptMode=REQUEUE); nothing to do, it starts again by itself.
#   JobState=RUNNING: the early warning (--signal=B:USR1@N) or a signal sent with scancel
#     --signal: the job requeues itself with "scontrol requeue".
#   anything else (COMPLETING, CANCELLED, TIMEOUT): Slurm is ending the job (scancel, the hard
#     time limit, a node failure) and does not requeue it; resubmitting resumes it.
slurm_run_and_requeue() {
  local start_mark
  start_mark=$(mktemp "${TMPDIR:-/tmp}/slurm_start.XXXXXX")
  if [[ -n $_SLURM_STOP_SIG ]]; then
    # Stopped while setting up: starting the training now would only be killed again.
    SLURM_CHILD_RC=0
    SLURM_STOP_SIGNAL=$_SLURM_STOP_SIG
  else
    slurm_log "running: ${*:2}"
    slurm_run_forwarding "$@"
  fi
  local rc=$SLURM_CHILD_RC
  if [[ -z $SLURM_STOP_SIGNAL ]]; then
    rm -f "$start_mark"
    slurm_log "training exited with status $rc"
    exit "$rc"
  fi
  slurm_log "training processes exited with status $rc after SIG$SLURM_STOP_SIGNAL"
  local finished=0 ckpt=""
  # The trainer writes model.pt only when the run is complete.
  [[ $OUTPUT_DIR/model.pt -nt $start_mark ]] && finished=1
  if [[ -d $OUTPUT_DIR/checkpoints ]]; then
    ckpt=$(find "$OUTPUT_DIR/checkpoints" -maxdepth 1 -name 'step_*.pt' ! -name '*shard*' -newer "$start_mark" | sort | tail -n 1)
  fi
  rm -f "$start_mark"
  if ((finished)); then
    slurm_log "the run had finished; not requeued"
    exit "$rc"
  fi
  if [[ -n $ckpt ]]; then
    slurm_log "checkpoint written at the signal: $ckpt"
  else
    slurm_log "warning: no checkpoint was written after the signal; a restart resumes from the newest older one in $OUTPUT_DIR (if any)"
  fi
  if [[ -z ${SLURM_JOB_ID:-} ]]; then
    slurm_log "not inside a Slurm job; not requeued (rerun the same command to resume)"
    exit "$rc"
  fi
  local state restarts
  state=$(slurm_job_field JobState)
  restarts=$(slurm_job_field Restarts)
  if [[ $restarts =~ ^[0-9]+$ ]] && ((restarts > ${SLURM_RESTART_COUNT:-0})); then
    slurm_log "Slurm has requeued job $SLURM_JOB_ID itself (restart $restarts, scontrol requeue or preemption); it resumes from the newest checkpoint in $OUTPUT_DIR"
    exit 0
  fi
  if [[ -n $state && $state != RUNNING ]]; then
    slurm_log "Slurm is ending job $SLURM_JOB_ID (JobState=$state: scancel, the time limit or a node failure) without requeueing it; resubmit it to resume from $OUTPUT_DIR"
    exit "$rc"
  fi
  if ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-50})); then
    slurm_log "job already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES=${MAX_REQUEUES:-50}); not requeued"
    exit "$rc"
  fi
  # Slurm answers the requeue with SIGTERM to this shell: let it finish its message.
  trap '' TERM USR1
  # shellcheck disable=SC2086
  if $SCONTROL requeue "$SLURM_JOB_ID"; then
    slurm_log "job $SLURM_JOB_ID requeued; it resumes from the newest checkpoint in $OUTPUT_DIR"
    exit 0
  fi
  slurm_log "warning: '$SCONTROL requeue $SLURM_JOB_ID' failed (JobState=${state:-unknown}); resubmit to resume from $OUTPUT_DIR"
  exit "$rc"
}
