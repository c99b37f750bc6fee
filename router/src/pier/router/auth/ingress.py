"""The one way in. Every entry point — REST, bridgekit's `/chat`, the MCP relay, WebSocket — takes a
request through the same steps, in this order:

1. **identity** (`identify`): who is calling — an app key, a user key, a client certificate, a
   token from the company's identity provider (`oidc`), or, on the few routes a browser opens, the
   portal's sign-in cookie (`signin`);
2. **admission** (`admit`): may that caller act for this user, is the user id valid, does the
   profile exist, is the user within their rate limit → a `Caller`;
3. **tool rules and policy hook** (`gate`, `pier.core.policy.Gate`): the profile's built-in allow
   and deny lists, then the external hook, for every call and message before it is forwarded,
   and for every answer before the caller sees it;
4. then the session and its bridge (`pier.router.calls`, `mcp.relay`, `mcp.websocket`);
5. **audit and accounting** (`finish`): the audit record, the metrics, the dashboard's recent calls.

The job pool applies step 3 to results it delivers, with the same `Gate`.
"""

from __future__ import annotations

import collections
import time
from typing import Any

from aiohttp import web

from pier.core import logs, tracing
from pier.core.catalog import Catalog, Profile
from pier.core.errors import PierError
from pier.core.names import DISCOVERY_USER, USER_ID_RULE, is_user_id
from pier.core.policy import Caller, Gate, PolicyDenied
from pier.core.tls import peer_subject
from pier.router.accounts.service import SUBJECT_TOKEN
from pier.router.auth.keys import KeyRing, Principal, presented_key
from pier.router.auth.oidc import TokenVerifier, looks_like_jwt, router_url
from pier.router.auth.ratelimit import RateLimiter
from pier.router.auth.signin import SESSION_COOKIE, PortalSession, PortalSessions, same_origin
from pier.router.config import RouterSettings
from pier.router.metrics import RouterMetrics

# Outcomes that are not errors of the call (a tool's own error result counts as an answer).
SUCCESS = frozenset({"completed", "queued", "replayed", "tool_error"})
PRINCIPAL = web.RequestKey("principal", Principal)
PORTAL_SESSION = web.RequestKey("portal_session", PortalSession)


class Ingress:
    def __init__(
        self,
        settings: RouterSettings,
        catalog: Catalog,
        keys: KeyRing,
        limiter: RateLimiter,
        gate: Gate,
        metrics: RouterMetrics,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.portal: PortalSessions | None = None  # signed-in portal sessions, when the portal signs users in
        self.catalog = catalog
        self.keys = keys
        self.limiter = limiter
        self.gate = gate
        self.metrics = metrics
        # What the dashboard shows: the latest calls, and totals since start.
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)
        self.total = 0
        self.errors = 0

    # -- 1. identity ---------------------------------------------------------------------------

    async def identify(self, request: web.Request, cookie: bool = False) -> Principal:
        """Who is calling (UNAUTHENTICATED when credentials are configured and none fits). Kept on the request.

        `cookie`: the route is one a browser opens, where the portal's sign-in cookie identifies too.
        """
        with tracing.span("identify") as span:
            principal = await self._identify(request, cookie)
            span.set("pier.key_class", principal.key_class)  # what kind of credential: never the credential
        request[PRINCIPAL] = principal
        return principal

    async def _identify(self, request: web.Request, cookie: bool) -> Principal:
        key = presented_key(request)
        base_url = router_url(request, self.settings.public_url)
        if key is None and cookie and self.portal is not None and SESSION_COOKIE in request.cookies:
            session = await self.portal.get(request.cookies[SESSION_COOKIE])
            if session is not None:
                if request.method not in ("GET", "HEAD") and not same_origin(request, base_url):
                    raise PierError("FORBIDDEN", "a signed-in browser may change this only from the router's own pages")
                request[PORTAL_SESSION] = session
                if session.subject_token is not None:
                    SUBJECT_TOKEN.set((session.issuer, session.subject_token))
                return session.principal()
        if key is not None and self.verifier is not None and looks_like_jwt(key):
            principal = await self.verifier.verify(key, base_url)
            issuer = (principal.claims or {}).get("iss")
            if isinstance(issuer, str):
                SUBJECT_TOKEN.set((issuer, key))  # for this request only: a token exchange starts from it
            return principal
        return self.keys.authenticate(key, peer_subject(request), self.settings.cert_user_auth)

    # -- 2. admission --------------------------------------------------------------------------

    async def admit(self, request: web.Request, user: str, server: str, via: str) -> tuple[Caller, Profile]:
        """The caller, allowed to act for `user` on profile `server` (and that profile), within the
        user's rate limit."""
        if not is_user_id(user):
            raise PierError("BAD_REQUEST", USER_ID_RULE)
        if user == DISCOVERY_USER:
            raise PierError("FORBIDDEN", f"{user!r} is reserved for the router's own sessions")
        principal = principal_of(request)
        principal.check_user(user)
        profile = self.catalog.get(server)
        if not profile.usable_by(groups_of(principal)):
            raise PierError("FORBIDDEN", f"{server} is for members of " + ", ".join(profile.allowed_groups))
        logs.bind(user=user, profile=server)  # for the rest of this request's log lines
        with tracing.span("rate limit", attributes={"pier.user": user, "pier.profile": server, "pier.via": via}):
            await self.limiter.check(principal, user)
        return self.caller(principal, user, profile, via), profile

    def caller(self, principal: Principal, user: str, profile: Profile, via: str) -> Caller:
        return Caller(
            identity=principal.identity(),
            key_id=principal.key_id,
            user=user,
            profile=profile.name,
            policy_url=self.policy_url(profile),
            tool_rules=profile.tools,
            via=via,
            groups=principal.groups,
        )

    def policy_url(self, profile: Profile) -> str | None:
        return profile.policy_url or self.settings.policy_url

    # -- 5. audit and accounting ---------------------------------------------------------------

    def finish(
        self, caller: Caller, tool: str, arguments: Any, outcome: str, started: float,
        denied: PolicyDenied | None = None,
    ) -> None:  # fmt: skip
        """A call is over (`outcome`: completed, queued, tool_error, replayed, or an error code)."""
        elapsed = time.monotonic() - started
        self.gate.audit(caller, tool, arguments, outcome, started, denied)
        success = outcome in SUCCESS
        # Only calls that reached a real tool name it in a label: callers cannot grow the label set.
        label = tool if success else "other"
        self.metrics.call_duration.labels(caller.profile, label).observe(elapsed)
        self.metrics.calls.labels(caller.profile, outcome).inc()
        self.total += 1
        self.errors += not success
        trace = tracing.current()
        self.recent.appendleft(
            {
                "at": time.time(),
                "user": caller.user,
                "server": caller.profile,
                "tool": tool,
                "outcome": outcome,
                "via": caller.via,
                "duration_ms": round(elapsed * 1000, 1),
                "trace_id": trace.trace_id if trace is not None else None,  # to find the call in the traces
            }
        )


def groups_of(principal: Principal) -> tuple[str, ...] | None:
    """The groups that decide which profiles a caller may use (None: an app key or an open router, for
    which groups do not matter)."""
    return None if principal.key_class in ("app", "open") else principal.groups


def principal_of(request: web.Request) -> Principal:
    """The caller `identify` found for this request."""
    return request[PRINCIPAL]
