#!/bin/bash
# Pretrain clip on Slurm (configs/experiment/cc12m_clip.yaml); submits itself, see slurm/pretrain.sh:
#   slurm/pretrain_clip.sh 'data.train=/data/cc12m/{00000..01242}.tar' launch.nodes=4
exec "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" --config experiment/cc12m_clip "$@"
