"""Configuration of trainer -> engine weight sync."""

from dataclasses import dataclass

from miles.errors import ConfigError

TRANSPORTS = ("distributed", "disk")


@dataclass(frozen=True)
class WeightSyncConfig:
    """How updated weights reach the rollout engines after each train step."""

    transport: str = "distributed"
    """"distributed": a torch.distributed broadcast group with the engines (gloo on CPU, nccl on GPU)
    through /init_weights_update_group + /update_weights_from_distributed; "disk": HF safetensors
    in run_dir/weights/<version> loaded through /update_weights_from_disk."""
    bucket_mb: float = 512.0
    """Bucket size of the distributed transport (one HTTP call + broadcasts per bucket). Each
    bucket costs an HTTP round trip and the engine's load step, so larger is faster (2× H200,
    3.44 GB: 41 GB/s at 64 MB, 80 at 256, 125 at 1024; docs/benchmarks.md P2) at the price of
    that much extra GPU memory on the trainer's source rank and each engine while syncing."""
    master_port: int = 0
    """Port of the weight-update group's rendezvous on the trainer's source rank (0 = pick a free one)."""
    keep_disk_versions: int = 1
    """Disk transport: how many weight folders to keep (older ones are deleted)."""

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ConfigError(f"weight_sync.transport={self.transport!r} is not one of {TRANSPORTS}")
        if self.bucket_mb <= 0:
            raise ConfigError(f"weight_sync.bucket_mb must be > 0, got {self.bucket_mb}")
        if self.keep_disk_versions < 1:
            raise ConfigError("weight_sync.keep_disk_versions must be >= 1")
