#!/bin/bash
# Pretrain clip (configs/experiment/cc12m_clip.yaml) on Slurm: one task per GPU; see slurm/pretrain.sh.
#   sbatch slurm/pretrain_clip.sh data.train=/data/cc12m/{00000..01242}.tar
#   sbatch --nodes=4 slurm/pretrain_clip.sh train.lr=5e-4
# CPU-only test nodes: sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 ... (command-line
# options override the #SBATCH lines below).
#SBATCH --job-name=clip
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a copy of this script, so find the repository through the path it was submitted from.
ALIGNCLIP_ROOT="${ALIGNCLIP_ROOT:-$(cd "$(dirname "$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")/.." && pwd)}"
export ALIGNCLIP_ROOT ALIGNCLIP_DEFAULT_CONFIG="experiment/cc12m_clip"
source "$ALIGNCLIP_ROOT/slurm/pretrain.sh"
