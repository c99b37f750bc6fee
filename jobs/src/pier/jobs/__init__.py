"""The job pool: calls that overran the router's timeout, finished exactly once.

``worker`` (``pier jobs``) follows each job's call on its session's bridge until it ends;
``webhooks`` delivers results. Job records, their states and the Redis stream are shared with the
router, so they live in the core (``pier.core.job``, ``pier.core.jobstore``).
"""
