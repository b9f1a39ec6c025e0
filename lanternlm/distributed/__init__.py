"""Tensor parallelism: one model split over the ranks of a torch.distributed process group.

plan.py decides which heads, MLP columns and vocabulary rows each rank keeps (`plan_shards`); shard.py is the
transform that cuts a built model down to one rank's part and puts the collectives between the parts
(`shard_model`). Launching the ranks and driving them from rank 0 is the runtime's work, in modules of its own.
"""
