"""Tensor and pipeline parallelism: one engine over several processes, each holding part of the model.

    rank 0 (the engine core: scheduler, block manager, sampler)      ranks 1..N*P-1 (follower.py)
      plan -> step inputs as one int tensor ---- broadcast ----------->  the same inputs
      forward on its part   <---- TP: all-reduce after o_proj/down_proj ---->  forward on its part
                            <---- PP: the residual stream, stage to stage --->
      logits: all-gather of each TP rank's vocabulary slice (stage 0)
      samples                                                            (waits for the next step)

Each rank holds its stage's layers (pipe.py) and, within them, its query heads, its KV heads
(replicated when there are fewer KV heads than TP ranks), its slice of the MLP and of the
vocabulary (shard.py), and its part of every KV block: the block ids rank 0's block manager
hands out mean the same block on every rank. Nothing crosses between ranks but tensors and
fixed-size integer headers (plan.py); nothing is pickled.
"""
