#!/bin/bash
# Pretrain on Slurm: the one launch script. Run it (do not sbatch it); it submits itself with the resources of the
# config's `launch` section, and the same file then runs as the job's batch script.
#
#   slurm/pretrain.sh --config experiment/cc12m_alignclip [--SBATCH-OPTION ...] [key=value ...]
#   slurm/pretrain.sh --config experiment/cc12m_alignclip launch.nodes=4 'data.train=/data/cc12m/{00000..01242}.tar'
#
# Quote data patterns: unquoted, bash expands {00000..01242} into 1243 separate arguments before we see them.
# key=value arguments are config overrides (checked before submission: a typo fails here, naming the key);
# arguments starting with -- (other than --config) go to sbatch as they are (--dependency=..., --parsable, ...).
# Resources (nodes, tasks, GPUs, CPUs, time, partition, account, ...) come from `launch.*`
# (`python -m alignclip.launch sbatch-args`), so `launch.nodes=4 launch.timeout_min=120` replaces sbatch flags.
#
# In the job: one srun task per GPU runs `python -m alignclip.train`. Output goes to sbatch's --output file AND is
# appended to <run_dir>/logs/slurm-<job>.out. Preemption: the batch shell traps TERM, USR1, USR2, INT and HUP (as
# sent by `scancel -b` or `scancel --full`) and forwards them to the job step, whose trainers save a checkpoint and
# exit with REQUEUE_EXIT_CODE. The trainers exit with it too after any cause outside the model (a data source that
# failed, a killed loader worker, a loader timeout, a lost peer: saved at the last completed step whenever the
# ranks still can); the job then requeues itself (`python -m alignclip.launch requeue`, the same routine as
# submitit jobs use) and the requeued job resumes from <run_dir>, which is stable.
#
# Environment knobs: ALIGNCLIP_ROOT (the repository; default: this script's parent folder), ALIGNCLIP_PYTHON
# (default: <root>/.venv/bin/python if present, else python), ALIGNCLIP_ENV_FILE (cluster environment; default
# launch.env_file, then slurm/env.sh).
set -euo pipefail

CONFIG=""
SBATCH_EXTRA=()
OVERRIDES=()
while [ "$#" -gt 0 ]; do
    case "$1" in
        --config|-c) CONFIG="${2:?--config needs a file}"; shift 2 ;;
        --config=*) CONFIG="${1#--config=}"; shift ;;
        --*) SBATCH_EXTRA+=("$1"); shift ;;
        *) OVERRIDES+=("$1"); shift ;;
    esac
done
if [ -z "$CONFIG" ]; then
    echo "pretrain.sh: --config FILE is required (or use slurm/pretrain_{alignclip,clip,sharedclip}.sh)" >&2
    exit 2
fi

if [ -z "${ALIGNCLIP_SUBMITTED:-}" ] || [ -z "${SLURM_JOB_ID:-}" ]; then
    # ---------------------------------------------------------------- submit: resources from the config
    ALIGNCLIP_ROOT="${ALIGNCLIP_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
    if [ -z "${ALIGNCLIP_PYTHON:-}" ]; then
        if [ -x "$ALIGNCLIP_ROOT/.venv/bin/python" ]; then ALIGNCLIP_PYTHON="$ALIGNCLIP_ROOT/.venv/bin/python"
        else ALIGNCLIP_PYTHON=python; fi
    fi
    FLAGS_TEXT="$(PYTHONPATH="$ALIGNCLIP_ROOT${PYTHONPATH:+:$PYTHONPATH}" "$ALIGNCLIP_PYTHON" -m alignclip.launch \
        sbatch-args --config "$CONFIG" "${OVERRIDES[@]}")"  # a config error stops here (exit 2)
    mapfile -t FLAGS <<< "$FLAGS_TEXT"
    # sbatch exports this environment to the job (and keeps it for requeued runs): the marker says "run, do not
    # submit again"; sbatch runs a copy of this file, so the job finds the repository through ALIGNCLIP_ROOT.
    export ALIGNCLIP_ROOT ALIGNCLIP_PYTHON ALIGNCLIP_SUBMITTED=1
    exec sbatch "${FLAGS[@]}" "${SBATCH_EXTRA[@]}" "$ALIGNCLIP_ROOT/slurm/pretrain.sh" --config "$CONFIG" \
        "${OVERRIDES[@]}"
fi

# -------------------------------------------------------------------- run: the job's batch shell
unset ALIGNCLIP_SUBMITTED  # anything the job starts itself submits normally
PYTHON="$ALIGNCLIP_PYTHON"
export PYTHONPATH="$ALIGNCLIP_ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"  # relative paths in the config (output_dir, data) are relative to submission

# RUN_DIR, CONFIG_PATH, REQUEUE_EXIT_CODE, MAX_REQUEUES, ENV_FILE, MASTER_PORT (seeded from the job id)
LAUNCH_ENV="$("$PYTHON" -m alignclip.launch shell-env --config "$CONFIG" "${OVERRIDES[@]}")"
eval "$LAUNCH_ENV"
# shellcheck disable=SC1090
source "${ALIGNCLIP_ENV_FILE:-$ENV_FILE}"

mkdir -p "$RUN_DIR/logs"
LOG="$RUN_DIR/logs/slurm-${SLURM_JOB_ID}.out"
# tee ignores the preemption signals: `scancel --full` signals every child of the batch shell, and a dead tee
# would take the job's output (and, through SIGPIPE, the shell) with it.
exec > >(trap '' TERM USR1 USR2 INT HUP; exec tee -a "$LOG") 2>&1

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_ADDR MASTER_PORT
# Slurm >= 22.11 no longer passes sbatch's --cpus-per-task to srun implicitly.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

echo "[pretrain] $(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} tasks, master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"

# Signals to the batch shell go to the step's tasks through slurmd (`scancel --signal`, steps only): sending them
# to srun instead would not do, since srun answers SIGTERM by cancelling the step and SIGINT by printing status.
forward() {
    echo "[pretrain] $(date -Is) batch shell received SIG$1: forwarding it to the job step"
    scancel --signal="$1" "$SLURM_JOB_ID" || echo "[pretrain] scancel --signal=$1 failed"
}
for sig in TERM USR1 USR2 INT HUP; do
    # shellcheck disable=SC2064
    trap "forward $sig" "$sig"
done

set +e
# --kill-on-bad-exit=0: after a preemption every rank exits with REQUEUE_EXIT_CODE; killing the others when the
# first one exits could cut rank 0 short while it publishes the checkpoint.
# Each task names its rank and host (the layout, in the log), then becomes the trainer (exec: signals reach it).
# srun runs in the background: bash runs a trap only between commands, and `wait` returns when one arrives.
srun --label --kill-on-bad-exit=0 bash -c 'echo "[pretrain] rank $SLURM_PROCID/$SLURM_NTASKS on $(hostname)"; exec "$@"' \
    task "$PYTHON" -m alignclip.train --config "$CONFIG_PATH" "${OVERRIDES[@]}" "run_dir=$RUN_DIR" &
STEP_PID=$!
while true; do
    wait "$STEP_PID"
    rc=$?
    kill -0 "$STEP_PID" 2>/dev/null || break  # a trap interrupted the wait while the step still runs: wait on
done
if [ "$rc" -gt 128 ]; then  # the last wait was interrupted just as the step ended: its status is still kept
    wait "$STEP_PID"
    rc=$?
fi
set -e
# The step is over: nothing to forward any more (and `scontrol requeue` itself TERMs this shell).
trap '' TERM USR1 USR2 INT HUP

if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then
    if "$PYTHON" -m alignclip.launch requeue --max-requeues "$MAX_REQUEUES"; then
        exit 0
    fi
fi
echo "[pretrain] $(date -Is) trainer exited with ${rc}"
exit "$rc"
