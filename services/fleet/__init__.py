"""The fleet in Redis: which instances are alive, where they listen, how loaded they are, and
which KV blocks each holds. Workers write it (member.py), the router and decode workers read
it (directory.py). Torch-free: the router imports it.

    schema.py        key layout and the instance record
    scripts.py       the Lua scripts (register, heartbeat, publish, resync, list, lookup)
    events.py        a worker's mirror of its prefix cache and the changes not yet published
    member.py        a worker's registration, heartbeat and index publishing
    directory.py     the live instances as last read, and the longest-prefix lookup
    redis_server.py  a private redis-server process (`pdserve serve`, tests)
"""
