"""The prompt prefix that tests/faults/sitecustomize.py makes fatal to a decode worker's stream."""

POISON = [7, 7, 7, 7, 7, 7, 7, 7]
