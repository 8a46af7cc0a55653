#!/bin/bash
# Shared body of slurm/pretrain_{clip,sharedclip,alignclip}.sh; those set ALIGNCLIP_DEFAULT_CONFIG and source this.
#
#   sbatch slurm/pretrain_alignclip.sh [--config FILE] [key=value ...]
#
# One srun task per GPU runs `python -m alignclip.train`; extra arguments are config overrides. The batch output
# goes to sbatch's --output file AND is appended to <run_dir>/logs/slurm-<job>.out (sbatch cannot put its own log
# into a directory that only the config knows). On the trainer's REQUEUE_EXIT_CODE (a checkpoint was saved after
# SIGUSR1/SIGTERM) the job requeues itself; the requeued job resumes from <run_dir>, which is stable.
#
# Environment knobs: ALIGNCLIP_ROOT (the repository; found from the submitted script otherwise),
# ALIGNCLIP_PYTHON (default: <root>/.venv/bin/python if present, else python), ALIGNCLIP_ENV_FILE (cluster
# environment; default launch.env_file, then slurm/env.sh).
set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
    echo "pretrain.sh: not inside a Slurm job; submit with: sbatch $0 [--config FILE] [key=value ...]" >&2
    exit 2
fi
: "${ALIGNCLIP_ROOT:?ALIGNCLIP_ROOT must name the repository}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"  # relative paths in the config (output_dir, data) are relative to submission

PYTHON="${ALIGNCLIP_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x "$ALIGNCLIP_ROOT/.venv/bin/python" ]; then PYTHON="$ALIGNCLIP_ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONPATH="$ALIGNCLIP_ROOT${PYTHONPATH:+:$PYTHONPATH}"

CONFIG="${ALIGNCLIP_DEFAULT_CONFIG:?the wrapper script sets ALIGNCLIP_DEFAULT_CONFIG}"
if [ "${1:-}" = "--config" ] || [ "${1:-}" = "-c" ]; then
    CONFIG="$2"
    shift 2
fi

# RUN_DIR, CONFIG_PATH, REQUEUE_EXIT_CODE, MAX_REQUEUES, ENV_FILE, MASTER_PORT (seeded from the job id)
LAUNCH_ENV="$("$PYTHON" -m alignclip.launch shell-env --config "$CONFIG" "$@")"  # a config error stops here
eval "$LAUNCH_ENV"
# shellcheck disable=SC1090
source "${ALIGNCLIP_ENV_FILE:-$ENV_FILE}"

mkdir -p "$RUN_DIR/logs"
LOG="$RUN_DIR/logs/slurm-${SLURM_JOB_ID}.out"
exec > >(tee -a "$LOG") 2>&1

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_ADDR MASTER_PORT
# Slurm >= 22.11 no longer passes sbatch's --cpus-per-task to srun implicitly.
export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"

echo "[pretrain] $(date -Is) job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} tasks, master ${MASTER_ADDR}:${MASTER_PORT}, run dir ${RUN_DIR}"

set +e
# --kill-on-bad-exit=0: after a preemption every rank exits with REQUEUE_EXIT_CODE; killing the others when the
# first one exits could cut rank 0 short while it publishes the checkpoint.
# Each task names its rank and host (the layout, in the log), then becomes the trainer (exec: signals reach it).
srun --label --kill-on-bad-exit=0 bash -c 'echo "[pretrain] rank $SLURM_PROCID/$SLURM_NTASKS on $(hostname)"; exec "$@"' \
    task "$PYTHON" -m alignclip.train --config "$CONFIG_PATH" "$@" "run_dir=$RUN_DIR"
rc=$?
set -e

if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ]; then
    if [ "${SLURM_RESTART_COUNT:-0}" -lt "$MAX_REQUEUES" ]; then
        echo "[pretrain] $(date -Is) checkpoint saved; requeueing job ${SLURM_JOB_ID}"
        scontrol requeue "$SLURM_JOB_ID"
        exit 0
    fi
    echo "[pretrain] preempted after ${SLURM_RESTART_COUNT:-0} requeues (launch.max_requeues=${MAX_REQUEUES}); stopping"
fi
echo "[pretrain] $(date -Is) trainer exited with ${rc}"
exit "$rc"
