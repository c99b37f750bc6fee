"""The kopf operator for `MCPSession`.

The resource's schema is shared with the router (``pier.core.mcpsession``; the CRD is generated from
it by ``tools/crd.py``); ``pods`` turns a spec into the Pod that runs it, ``handlers`` are kopf's
small handler functions, ``main`` runs them (``pier operator``).
"""
