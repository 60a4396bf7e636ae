# Platform preset gb200: NVIDIA GB200 NVL72 (4 GPUs per node, 18 nodes per NVLink domain), selected with
# `miles-submit --platform gb200` (inlined into the rendered job) or `MILES_PLATFORM=gb200 sbatch ...`.
# Every value yields to one already in the environment (VAR=${VAR:-default}), so a site's settings win.
#
# Multi-node NVLink (MNNVL) inside a rack needs the IMEX service and an IMEX channel in every step:
# Slurm's switch/nvidia_imex plugin creates /dev/nvidia-caps-imex-channels/channelN per job (or per
# segment with --network=unique-channel-per-segment, Slurm 25.11); the engine and trainer tasks check
# it before starting (miles.cluster.platforms.check_imex_channels) and name the fix when it is missing.
#   IMEX channels: https://docs.nvidia.com/multi-node-nvlink-systems/imex-guide/imexchannels.html
#   MNNVL tuning:  https://docs.nvidia.com/multi-node-nvlink-systems/multi-node-tuning-guide/nccl.html

# NCCL env docs (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html), NCCL_MNNVL_ENABLE:
# use multi-node NVLink between the nodes of one NVLink domain (GB200 MNNVL needs NCCL >= 2.25.2, per
# the MNNVL tuning guide above). 1 = enable; the default (2) only auto-detects, and we want a clear
# NCCL error instead of a silent fall-back to the network when IMEX is broken.
export NCCL_MNNVL_ENABLE=${NCCL_MNNVL_ENABLE:-1}
# NCCL env docs, NCCL_CUMEM_ENABLE: cuMem* allocations, which MNNVL buffers need (fabric handles exported
# through IMEX).
export NCCL_CUMEM_ENABLE=${NCCL_CUMEM_ENABLE:-1}
# NCCL env docs, NCCL_IB_HCA: between NVLink domains traffic goes over the rack's InfiniBand/RoCE NICs;
# "mlx5" selects the ConnectX ports by prefix. Sites with a rail layout set their own list.
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
