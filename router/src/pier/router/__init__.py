"""The router: Pier's stateless HTTP front door.

Data path: ``app`` (middleware: request id, auth, rate limit) → ``api`` / ``relay`` / ``compat``
→ ``calls`` (timeouts, retries, hand-off to the job pool) → ``backends`` (find or start the
user's session) → ``bridge_client`` (the session's bridge) and back.
"""
