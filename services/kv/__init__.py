"""KV blocks between workers: the wire format (wire.py) and the transports (transport.py)."""
