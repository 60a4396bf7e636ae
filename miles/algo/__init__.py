"""RL algorithm formulas in pure torch (CPU/GPU, no Megatron): advantages, policy loss, KL,
entropy, TIS/MIS corrections, loss reduction, and `AlgoConfig` that selects among them.

Modules: config (AlgoConfig), advantages, policy_loss, kl, entropy, corrections, reduction,
actor_loss (the composed per-micro-batch loss). Nothing is imported here, so `miles.algo.config`
stays torch-free.
"""
