"""The router's own Prometheus metrics: routing decisions, prefix hits, the fleet registry.

Hit rate of the fleet = routing_cached_tokens / routing_prompt_tokens (both counted when a
request finishes, from the decode instance's report); the index's accuracy shows in
routing_predicted_hit_tokens against routing_cached_tokens.

With --router-workers N (router/workers.py) each worker process keeps its own values and
/metrics shows the sums over all of them; the gauges say how to merge: the registry's, as the
worst any live worker sees it (Redis down in one worker is Redis down), and
router_process_requests once per live worker (label pid).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DECISIONS = Counter("pdserve:routing_decisions", "Routing decisions: which policy, for which role, and why",
                    ["policy", "role", "reason"])
PREDICTED_HIT_TOKENS = Counter("pdserve:routing_predicted_hit_tokens",
                               "Prompt tokens the prefix index placed on the chosen decode instance")
PROMPT_TOKENS = Counter("pdserve:routing_prompt_tokens", "Prompt tokens of finished requests")
CACHED_TOKENS = Counter("pdserve:routing_cached_tokens",
                        "Prompt tokens of finished requests that their decode instance had cached")
LOOKUP_SECONDS = Histogram("pdserve:prefix_index_lookup_seconds", "One prefix-index lookup (all instances)",
                           buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25))

MIGRATIONS = Counter("pdserve:request_migrations",
                     "Requests moved to another decode instance after their stream broke (by status) or stalled",
                     ["reason"])

REDIS_UP = Gauge("pdserve:redis_up", "1 while the router reads the fleet registry from Redis",
                 multiprocess_mode="livemin")
REGISTRY_AGE = Gauge("pdserve:registry_age_seconds", "Seconds since the fleet registry was last read (-1: never)",
                     multiprocess_mode="livemax")
INSTANCES = Gauge("pdserve:registry_instances", "Reachable instances the router routes to", ["role"],
                  multiprocess_mode="livemin")
REFUSED = Counter("pdserve:registry_refused_instances", "Registered instances refused: their block hashing differs")

# A gauge that only grows, because multiprocess mode sums counters but keeps gauges per process.
PROCESS_REQUESTS = Gauge("pdserve:router_process_requests",
                         "Requests this router process has taken since it started; with --router-workers, one "
                         "series per live worker (label pid): how the kernel spread client connections",
                         multiprocess_mode="liveall")
