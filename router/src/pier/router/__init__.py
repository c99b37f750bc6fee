"""The router: Pier's stateless HTTP front door.

Data path: ``app`` (the root app and its ``/v1`` sub-application; ``middleware``) →
``auth.ingress`` (identity, admission, rules and policy, audit and accounting) → a wing's route:
``rest`` (``v1``, ``bridgekit``, ``dashboard``) or ``mcp`` (``relay``, ``websocket``, ``aggregate``;
``tasks``), helped by ``shared`` → ``calls`` (timeouts, retries, hand-off to the job pool) →
``backends`` (find or start the user's session) → the session's bridge handle
(``pier.core.callapi``) and back.
"""
