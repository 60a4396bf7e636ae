"""Platform presets: the hardware facts the planner needs and the environment file the job sources.

    platform = get_platform("gb200")      # 4 GPUs per node, NVLink domains of 18 nodes, needs IMEX
    platform.preset_text()                # sbatch/platforms/gb200.sh, inlined by miles-submit --platform gb200
    check_imex_channels()                 # in a step: the IMEX channel devices, or ConfigError naming the fix

Each preset file (`sbatch/platforms/<name>.sh`) exports communication settings, one comment per variable
citing its source (NCCL/RCCL/ROCR docs, NVIDIA's MNNVL and IMEX guides). The facts below are what the
planner and the IMEX check use; docs/topology.md lists the sources of the hardware numbers.
"""

import glob
import os
from dataclasses import dataclass
from pathlib import Path

from miles.errors import ConfigError

PRESET_DIR = Path(__file__).resolve().parents[2] / "sbatch" / "platforms"
"""Where the preset shell files live in the Miles source tree."""
IMEX_CHANNEL_DIR = "/dev/nvidia-caps-imex-channels"
"""Where the driver's IMEX channel devices appear (NVIDIA IMEX guide, "IMEX Channels")."""


@dataclass(frozen=True)
class Platform:
    """Hardware facts of one platform preset."""

    name: str
    """The --platform value."""
    description: str
    """One line for the dry run."""
    gpus_per_node: int
    """GPUs of one node."""
    domain_nodes: int
    """Nodes of one fast-fabric domain (an NVL72 rack = 18 compute trays; 1 = the node itself)."""
    fabric: str
    """The domain's fabric, named in explanations."""
    needs_imex: bool
    """Whether multi-node NVLink needs an IMEX channel in every step."""

    def preset_path(self) -> Path:
        return PRESET_DIR / f"{self.name}.sh"

    def preset_text(self) -> str:
        """The preset shell file (inlined into the rendered job script)."""
        try:
            return self.preset_path().read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the {self.name} platform preset {self.preset_path()}: {exc}") from exc


PLATFORMS = {p.name: p for p in (
    Platform("gb200", "NVIDIA GB200 NVL72: 4 GPUs per node, multi-node NVLink domains of 18 nodes (IMEX)",
             4, 18, "NVLink", True),
    Platform("gb300", "NVIDIA GB300 NVL72: 4 GPUs per node, multi-node NVLink domains of 18 nodes (IMEX)",
             4, 18, "NVLink", True),
    Platform("h100", "NVIDIA HGX H100: 8 GPUs per node on NVLink, InfiniBand between nodes", 8, 1, "NVLink", False),
    Platform("h200", "NVIDIA HGX H200: 8 GPUs per node on NVLink, InfiniBand between nodes", 8, 1, "NVLink", False),
    Platform("mi355x", "AMD Instinct MI355X: 8 GPUs per node on xGMI, RCCL over RoCE/InfiniBand between nodes",
             8, 1, "xGMI", False),
)}


def get_platform(name: str) -> Platform:
    """The preset called name; ConfigError lists the known ones."""
    try:
        return PLATFORMS[name]
    except KeyError:
        raise ConfigError(f"unknown platform {name!r}; known platforms: {', '.join(PLATFORMS)}") from None


def check_imex_channels(platform: str, channel_dir: str = IMEX_CHANNEL_DIR) -> list[str]:
    """The IMEX channel devices this step sees (sorted); ConfigError when the platform needs one and there is none.

    Slurm's switch/nvidia_imex plugin mounts the job's channel into every srun step (not into the batch
    step itself), so this runs inside the engine and trainer tasks, before CUDA starts.
    """
    channels = sorted(os.path.basename(p) for p in glob.glob(os.path.join(channel_dir, "channel*")))
    if get_platform(platform).needs_imex and not channels:
        raise ConfigError(
            f"platform {platform} uses multi-node NVLink, which needs an IMEX channel, but {channel_dir}/ has no "
            f"channel* device in this step. Ask the cluster admins for SwitchType=switch/nvidia_imex in slurm.conf "
            f"(Slurm creates one channel per job), or create channel0 with mknod as the NVIDIA IMEX guide describes "
            f"and run the nvidia-imex service on every node; or submit without --platform {platform} to run "
            f"without multi-node NVLink.")
    return channels
