"""Who is calling and whether they may: the router's way in.

``ingress`` (the pipeline every entry point takes: identity → admission → rules and policy → audit
and accounting), ``keys`` (app and user keys, the principal), ``oidc`` (bearer tokens from trusted
identity providers), ``ratelimit`` (per-user limits in Redis), ``protected_resource`` (the router
as an OAuth protected resource: its metadata and the 401 challenge).
"""
