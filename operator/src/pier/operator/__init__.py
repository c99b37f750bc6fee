"""The kopf operator for `MCPSession` (imported as `pier.operator`; never the stdlib `operator`).

``models`` holds the resource's schema (the CRD is generated from it by ``crd``), ``pods`` turns a
spec into the Pod that runs it, ``handlers`` are kopf's small handler functions, ``main`` runs them.
"""
