# Platform preset mi355x: AMD Instinct MI355X (8 GPUs per node on xGMI; RCCL between nodes), selected
# with `miles-submit --platform mi355x` (inlined into the rendered job) or `MILES_PLATFORM=mi355x sbatch ...`.
# Every value yields to one already in the environment. Each node is its own xGMI domain: no --segment,
# no IMEX. RCCL reads the NCCL_* variables (RCCL env docs:
# https://rocm.docs.amd.com/projects/rccl/en/latest/api-reference/env-variables.html).

# ROCR-Runtime env docs (https://rocm.docs.amd.com/projects/ROCR-Runtime/en/latest/api-reference/
# environment_variables.html), HSA_NO_SCRATCH_RECLAIM: 1 = keep scratch memory assigned to its queue
# instead of reclaiming it after each large dispatch (avoids re-allocation stalls in training kernels).
export HSA_NO_SCRATCH_RECLAIM=${HSA_NO_SCRATCH_RECLAIM:-1}
# ROCm MI300X/MI355X workload tuning guide (https://rocm.docs.amd.com/en/latest/how-to/rocm-for-ai/
# inference-optimization/workload.html), RCCL section: NCCL_MIN_NCHANNELS=112 lets RCCL use enough
# channels to saturate the eight xGMI links.
export NCCL_MIN_NCHANNELS=${NCCL_MIN_NCHANNELS:-112}
# Same guide: TORCH_NCCL_HIGH_PRIORITY=1 runs PyTorch's RCCL streams at high priority, so collectives are
# not queued behind compute kernels.
export TORCH_NCCL_HIGH_PRIORITY=${TORCH_NCCL_HIGH_PRIORITY:-1}
# Same guide: GPU_MAX_HW_QUEUES=2 limits the HIP hardware queues per device (fewer queues, less
# contention between compute and communication).
export GPU_MAX_HW_QUEUES=${GPU_MAX_HW_QUEUES:-2}
# RCCL env docs, NCCL_IB_HCA: the scale-out NICs by prefix (RoCE/InfiniBand); sites set their own list
# (e.g. Pollara "ionic" or ConnectX "mlx5"), so it is only a default.
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
