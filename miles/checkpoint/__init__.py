"""Checkpoints: Megatron dist-checkpoint + RL state, manifest with checksums, atomic commit, resume.

Entry points: `miles.checkpoint.store.save_checkpoint` / `load_checkpoint`; configuration in
`miles.checkpoint.config.CheckpointConfig`.
"""
