"""Speculative decoding: a proposer guesses the next k tokens of a decoding sequence, the
target scores all k+1 positions in one step, and keeps the guesses as far as its own draw
agrees (verify.py). Proposers: n-gram prompt lookup (ngram.py), the target's first layers
(self-speculative) or a second model (draft.py); the speculator (speculator.py) plans it.
"""
