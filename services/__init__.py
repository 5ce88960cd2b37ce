"""pdserve services: the engine every worker runs, and (later) the prefill and decode workers."""
