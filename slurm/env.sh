# Cluster environment, sourced by slurm/pretrain.sh (and by submitit jobs) before the trainer starts.
# Copy and adapt it for your cluster, then point `launch.env_file=/path/to/my_env.sh` (or ALIGNCLIP_ENV_FILE) at
# the copy. Every value here only fills in what the caller's environment has not already set.

# Modules / environments, e.g.:
#   module load cuda/12.4 nccl
#   source /path/to/venv/bin/activate

# NCCL: log warnings only; async error handling so a dead rank fails the job instead of hanging it.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# The network interface NCCL and gloo bootstrap over (InfiniBand / the cluster fabric): set it when the
# default route's interface is not the one the nodes share, e.g. NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0.
# export NCCL_SOCKET_IFNAME=...
# export GLOO_SOCKET_IFNAME=...
# InfiniBand: NCCL_IB_HCA=mlx5 ; disable IB on ethernet-only clusters with NCCL_IB_DISABLE=1.

# One thread pool per task sized to its CPUs (torch would otherwise use every core of the node per task).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1
# Nothing reaches for a model hub at run time on compute nodes (they usually have no internet).
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
