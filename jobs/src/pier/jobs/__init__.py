"""The job pool: calls that overran the router's timeout, finished exactly once.

``store`` keeps job records, the Redis stream and the event channels; ``worker`` (``pier jobs``)
follows each job's call on its session's bridge until it ends; ``webhooks`` delivers results.
"""
