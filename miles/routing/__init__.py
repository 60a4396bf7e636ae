"""R3 (Rollout Routing Replay): the experts the rollout engine routed each token to, carried to the
trainer and replayed in its MoE layers.

`dump_store`: the node-local HDF5 store of routed experts between rollout and training.
"""
