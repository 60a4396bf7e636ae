"""Miles: Slurm-native RL post-training (SGLang rollout + Megatron-core training, no Ray)."""

__version__ = "0.1.0"
