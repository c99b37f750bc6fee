"""The pieces of the router's OAuth client and sign-in, one at a time: PKCE, discovery URLs, client
authentication, when a token is renewed, where a browser may be sent, which posts count as the router's own."""

from __future__ import annotations

import base64
import time

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from pier.router.accounts.flows import BROWSER_COOKIE, Flow, browser_digest
from pier.router.accounts.provider import AuthorizationServer, Metadata, discovery_urls, pkce_pair, s256
from pier.router.accounts.store import Connection, renew_at
from pier.router.auth.signin import browser_cookie, local_path, same_origin

pytestmark = pytest.mark.unit


def test_pkce_s256_is_rfc_7636s():
    # RFC 7636, appendix B.
    assert s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    verifier, challenge = pkce_pair()
    assert 43 <= len(verifier) <= 128
    assert set(verifier) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
    assert challenge == s256(verifier)
    assert pkce_pair()[0] != verifier


def test_discovery_urls_follow_rfc_8414_then_openid():
    assert discovery_urls("https://as.example.com") == [
        "https://as.example.com/.well-known/oauth-authorization-server",
        "https://as.example.com/.well-known/openid-configuration",
    ]
    assert discovery_urls("https://as.example.com/tenant1/") == [
        "https://as.example.com/.well-known/oauth-authorization-server/tenant1",
        "https://as.example.com/tenant1/.well-known/openid-configuration",
        "https://as.example.com/.well-known/openid-configuration/tenant1",
    ]


async def test_client_authentication_is_rfc_6749s():
    async with aiohttp.ClientSession() as http:
        confidential = AuthorizationServer(http, 5, "my client", "p@ss:w/rd", "https://as.example.com")
        headers, form = confidential._authenticate(Metadata(token_endpoint="https://as.example.com/token"), {"a": "1"})
        # §2.3.1: the id and secret form-urlencoded, then Basic.
        assert headers == {"Authorization": "Basic " + base64.b64encode(b"my%20client:p%40ss%3Aw%2Frd").decode()}
        assert form == {"a": "1"}
        post_only = Metadata(
            token_endpoint="https://x/token", token_endpoint_auth_methods_supported=["client_secret_post"]
        )
        headers, form = confidential._authenticate(post_only, {})
        assert (headers, form) == ({}, {"client_id": "my client", "client_secret": "p@ss:w/rd"})
        public = AuthorizationServer(http, 5, "spa", None, "https://as.example.com")
        assert public._authenticate(post_only, {}) == ({}, {"client_id": "spa"})


def test_a_token_is_renewed_before_it_expires_but_not_all_the_time():
    now = time.time()
    assert renew_at(None, now, 300) is None
    assert renew_at(now + 3600, now, 300) == now + 3300  # the margin
    assert renew_at(now + 60, now, 300) == now + 30  # a short-lived token: half its lifetime
    fresh = Connection(access_token="t", obtained_at=now, connected_at=now, expires_at=now + 3600)
    assert not fresh.due(now, 300)
    assert fresh.due(now + 3301, 300)
    view = fresh.view()
    assert "t" not in view.values()
    assert set(view) == {"connected", "status", "reason", "scopes", "expires_at", "connected_at", "refreshed_at",
                         "refreshable"}  # fmt: skip


def test_a_flow_binds_to_the_browser_that_started_it():
    flow = Flow(kind="connect", user="alice", profile="demo", verifier="v", redirect_uri="r",
                browser=browser_digest("cookie-a"), created_at=time.time())  # fmt: skip
    assert flow.bound_to("cookie-a")
    assert not flow.bound_to("cookie-b")
    assert not flow.bound_to(None)
    assert flow.model_copy(update={"browser": None}).bound_to(None)  # an app's flow: bound to its user only


def test_a_browser_is_only_ever_sent_to_this_router():
    assert local_path("/portal?x=1", "/d") == "/portal?x=1"
    for elsewhere in (None, "", "https://evil.example", "//evil.example/x", "/\\evil.example", "portal"):
        assert local_path(elsewhere, "/d") == "/d"


@pytest.mark.parametrize(
    ("headers", "own"),
    [
        ({"Origin": "https://pier.example.com", "Sec-Fetch-Site": "same-origin"}, True),
        ({"Origin": "https://pier.example.com"}, True),
        ({"Referer": "https://pier.example.com/portal"}, True),
        ({"Sec-Fetch-Site": "same-origin"}, True),
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "https://pier.example.com", "Sec-Fetch-Site": "same-site"}, False),
        ({"Origin": "https://pier.example.com:444"}, False),
        ({"Referer": "https://evil.example/page"}, False),
        ({"Origin": "null"}, False),
        ({}, False),
    ],
)
def test_which_posts_come_from_the_routers_own_pages(headers: dict[str, str], own: bool):
    request = make_mocked_request("POST", "/portal/logout", headers=headers)
    assert same_origin(request, "https://pier.example.com") is own


async def test_the_provider_sends_the_browser_back_past_the_steering_of_several_processes(tmp_path):
    """The callback is an open route: nobody is identified there, so several processes' steering (which
    routes a request by its caller's user) must let it through rather than ask for a caller."""
    from pier.router.app import caller_user
    from pier.router.auth.ingress import PRINCIPAL
    from pier.router.auth.keys import Principal
    from pier.router.processes import Peers, steering

    peers = Peers(index=0, count=2, run_dir=tmp_path)
    middleware = steering(peers, caller_user)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="served here")

    callback = make_mocked_request("GET", "/v1/oauth/callback?state=s&code=c")
    assert caller_user(callback) is None
    assert await _text(await middleware(callback, handler)) == "served here"
    # An identified caller's own routes are steered by their user (this one is process 0's).
    mine = next(user for user in (f"user-{n}" for n in range(100)) if peers.owner(user) == 0)
    request = make_mocked_request("GET", "/v1/me/servers/demo/connection")
    request[PRINCIPAL] = Principal("user", "k1", mine)
    assert caller_user(request) == mine
    assert await _text(await middleware(request, handler)) == "served here"


async def _text(response: web.StreamResponse) -> str | None:
    assert isinstance(response, web.Response)
    return response.text


@pytest.mark.parametrize(
    ("scheme", "base_url", "secure"),
    [
        ("http", "http://127.0.0.1:8000", False),
        ("https", "https://pier.example.com", True),
        ("http", "https://pier.example.com", True),  # TLS ended at an ingress: the router's URL says HTTPS
    ],
)
def test_the_browser_cookie_is_secure_whenever_browsers_use_https(scheme: str, base_url: str, secure: bool):
    request = make_mocked_request("GET", "/portal/login").clone(scheme=scheme)
    response = web.Response()
    value = browser_cookie(request, response, base_url)
    cookie = response.cookies[BROWSER_COOKIE]
    assert cookie.value == value
    assert (cookie["httponly"], cookie["samesite"], bool(cookie["secure"])) == (True, "Lax", secure)
    # A browser that has one keeps it (its flows stay bound to it).
    again = web.Response()
    assert browser_cookie(make_mocked_request("GET", "/", headers={"Cookie": f"{BROWSER_COOKIE}={value}"}), again,
                          base_url) == value  # fmt: skip
    assert BROWSER_COOKIE not in again.cookies


def test_the_portal_shows_what_a_link_says_only_by_code_or_by_a_servers_name():
    from pier.router.rest.portal import notice

    servers = {"demo", "github"}
    assert notice({"connected": "demo"}, servers) == "Account connected for demo."
    assert notice({"done": "secrets"}, servers) == "Secrets saved."
    # A crafted link cannot put its own words on the signed-in user's page.
    for query in ({"connected": "demo. Your session expired: sign in again at https://evil.example"},
                  {"done": "Call +1 555 0100"}, {}):  # fmt: skip
        assert notice(query, servers) == ""
