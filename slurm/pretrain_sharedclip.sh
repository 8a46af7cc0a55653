#!/bin/bash
# Pretrain sharedclip on Slurm (configs/experiment/cc12m_sharedclip.yaml); submits itself, see slurm/pretrain.sh:
#   slurm/pretrain_sharedclip.sh 'data.train=/data/cc12m/{00000..01242}.tar' launch.nodes=4
exec "$(dirname "${BASH_SOURCE[0]}")/pretrain.sh" --config experiment/cc12m_sharedclip "$@"
