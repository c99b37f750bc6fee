"""Defaults that more than one component applies, each defined once (no pydantic: the bridge imports it)."""

MAX_CONCURRENT_CALLS = 16  # calls one session runs at once (a profile's `max_concurrent_calls`)
SESSION_TTL_S = 3600  # idle time after which a session is reaped, when its profile sets none
CALL_TIMEOUT_S = 25.0  # hand-off threshold, when neither the request nor the profile sets one
# Latency histogram buckets (seconds), the same for the router's and every bridge's metrics.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
