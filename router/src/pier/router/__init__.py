"""The router: Pier's stateless HTTP front door.

Data path: ``app`` (the root app and its ``/v1`` sub-application; ``middleware``) → ``ingress``
(identity, admission, rules and policy, audit and accounting) → ``api`` / ``relay`` /
``websocket`` / ``compat`` → ``calls`` (timeouts, retries, hand-off to the job pool) →
``backends`` (find or start the user's session) → the session's bridge handle
(``pier.core.callapi``) and back.
"""
