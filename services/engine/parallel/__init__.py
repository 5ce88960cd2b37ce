"""Tensor parallelism: one engine over several processes, each holding a shard of the model.

    rank 0 (the engine core: scheduler, block manager, sampler)      ranks 1..N-1 (follower.py)
      plan -> step inputs as int tensors --- broadcast --------------->  same inputs
      forward on its shard   <---- all-reduce after o_proj/down_proj ---->  forward on its shard
      logits: all-gather of each rank's vocabulary slice <------------->
      samples                                                           (waits for the next step)

Each rank holds its query heads, its KV heads (replicated when there are fewer KV heads than
ranks), its slice of the MLP and of the vocabulary, and its shard of every KV block: the
block ids rank 0's block manager hands out mean the same block on every rank. Nothing crosses
between ranks but tensors and fixed-size integer headers; nothing is pickled.
"""
