# Platform preset h200: NVIDIA HGX H200 (8 GPUs per node; NVLink only inside a node, InfiniBand between
# nodes), selected with `miles-submit --platform h200` (inlined into the rendered job) or
# `MILES_PLATFORM=h200 sbatch ...`. Every value yields to one already in the environment.
# Each node is its own NVLink domain: no --segment, no IMEX channel; the planner keeps TP groups and
# engines of <= 8 GPUs inside a node (docs/topology.md).

# NCCL env docs (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html), NCCL_IB_DISABLE:
# 0 = use the InfiniBand verbs transport between nodes (never fall back to TCP sockets silently).
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}
# NCCL env docs, NCCL_IB_HCA: the HCAs to use, by prefix; "mlx5" = the ConnectX-7 ports of an HGX node
# (one per GPU). A site with storage or management ports on mlx5 too lists the compute rails instead.
export NCCL_IB_HCA=${NCCL_IB_HCA:-mlx5}
# NCCL env docs, NCCL_NET_GDR_LEVEL: use GPUDirect RDMA when GPU and NIC share a PCIe switch (PIX), the
# HGX layout (each GPU has its NIC behind the same switch).
export NCCL_NET_GDR_LEVEL=${NCCL_NET_GDR_LEVEL:-PIX}
# NCCL env docs, NCCL_SOCKET_IFNAME: interfaces for NCCL's bootstrap and socket traffic; "^lo,docker"
# excludes loopback and docker bridges (the documented exclusion syntax).
export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-^lo,docker}
