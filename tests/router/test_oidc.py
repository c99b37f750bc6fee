"""The claim checks a bearer token must pass (`pier.router.auth.oidc`), with tokens this test mints
itself. The issuer is a small discovery + JWKS server of the test's own on loopback (the real
provider's sign-in flow is tests/router/test_identity.py's subject): what is checked here is the
verifier's judgement of each claim, and how it fetches and refreshes keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pier.core.errors import PierError
from pier.router.auth.oidc import LEEWAY_S, IssuerConfig, TokenVerifier, looks_like_jwt

pytestmark = pytest.mark.unit

BASE = "https://pier.example.com"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(key: Any, kid: str, alg: str, use: str = "sig") -> dict[str, Any]:
    public = key.public_key()
    if alg == "RS256":
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public)
    elif alg == "ES256":
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(public)
    return {**json.loads(jwk), "kid": kid, "alg": alg, "use": use}


class Issuer:
    """Discovery and a JWKS, served on loopback; counts how often each is asked."""

    def __init__(self) -> None:
        self.url = ""
        self.keys = [public_jwk(RSA_KEY, "rsa-1", "RS256"), public_jwk(EC_KEY, "ec-1", "ES256"),
                     public_jwk(ED_KEY, "ed-1", "EdDSA")]  # fmt: skip
        self.named_issuer: str | None = None  # what discovery claims the issuer is (default: itself)
        self.asked: dict[str, int] = {"discovery": 0, "jwks": 0}

    async def discovery(self, request: web.Request) -> web.Response:
        self.asked["discovery"] += 1
        return web.json_response({"issuer": self.named_issuer or self.url, "jwks_uri": self.url + "/jwks"})

    async def jwks(self, request: web.Request) -> web.Response:
        self.asked["jwks"] += 1
        return web.json_response({"keys": self.keys})


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    served = Issuer()
    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", served.discovery)
    app.router.add_get("/jwks", served.jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    served.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield served
    finally:
        await runner.cleanup()


def mint(issuer: str, key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa-1", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": issuer, "sub": "alice", "aud": BASE, "iat": now, "exp": now + 300, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def hs256(header: dict[str, Any], payload: dict[str, Any], secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


def verifier(http: aiohttp.ClientSession, *configs: IssuerConfig, public_url: str | None = None) -> TokenVerifier:
    return TokenVerifier(list(configs), http, public_url)


async def refused(check: TokenVerifier, token: str, base: str = BASE) -> PierError:
    with pytest.raises(PierError) as caught:
        await check.verify(token, base)
    return caught.value


async def test_a_good_token_stands_for_its_user_and_nothing_more(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    token = mint(issuer.url, email="a@example.com", groups=["ops", 7], azp="app", nonce="n", at_hash="h")
    principal = await check.verify(token, BASE)
    assert (principal.key_class, principal.user_id) == ("token", "alice")
    assert principal.key_id.startswith("oidc:")
    assert token not in repr(principal)
    assert principal.groups == ("ops", "7")
    # Only the claims policy may use: no technical ones (nonce, hashes, times), never the token.
    assert principal.claims == {"iss": issuer.url, "sub": "alice", "email": "a@example.com", "groups": ["ops", 7],
                                "azp": "app"}  # fmt: skip


@pytest.mark.parametrize(("key", "alg", "kid"), [(EC_KEY, "ES256", "ec-1"), (ED_KEY, "EdDSA", "ed-1")])
async def test_every_asymmetric_algorithm_the_issuer_publishes_works(
    issuer: Issuer, http: aiohttp.ClientSession, key: Any, alg: str, kid: str
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    assert (await check.verify(mint(issuer.url, key, alg, kid), BASE)).user_id == "alice"


async def test_unsigned_and_hmac_tokens_are_refused_before_any_key_is_looked_at(
    issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    claims = {"iss": issuer.url, "sub": "alice", "aud": BASE, "exp": time.time() + 60}
    unsigned = jwt.encode(claims, None, "none")  # type: ignore[arg-type]  # PyJWT takes no key for "none"
    assert "algorithm 'none'" in (await refused(check, unsigned)).message
    # The classic confusion: HMAC keyed with the issuer's *public* key, which anyone can fetch (written
    # by hand: PyJWT itself refuses to sign HS256 with a PEM key).
    public_pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
    claims = {"iss": issuer.url, "sub": "alice", "aud": BASE, "exp": int(time.time()) + 60}
    forged = hs256({"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims, public_pem)
    err = await refused(check, forged)
    assert "algorithm 'HS256'" in err.message
    assert (err.code, err.http_status, err.details) == ("UNAUTHENTICATED", 401, {"reason": "invalid_token"})
    assert issuer.asked == {"discovery": 0, "jwks": 0}


@pytest.mark.parametrize("token", ["", "a.b", "a.b.c", "not-a-jwt", "e30.e30.e30"])
async def test_something_that_is_not_a_jwt_is_refused(http: aiohttp.ClientSession, token: str) -> None:
    check = verifier(http, IssuerConfig(issuer="http://127.0.0.1:9"))
    err = await refused(check, token)
    assert "well-formed" in err.message or "algorithm None" in err.message  # e30 is `{}`: no algorithm


async def test_a_token_from_an_untrusted_issuer_is_refused(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    for iss in ("https://evil.example.com", issuer.url + "/", None):
        assert "not trusted" in (await refused(check, mint(iss) if iss else mint("", iss=None))).message
    assert issuer.asked["jwks"] == 0


async def test_a_signature_by_another_key_under_a_published_kid_is_refused(
    issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    err = await refused(check, mint(issuer.url, key=OTHER_RSA_KEY, kid="rsa-1"))
    assert err.message.endswith("InvalidSignatureError")


async def test_times_are_checked_with_a_minutes_leeway(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    now = int(time.time())
    assert "expired" in (await refused(check, mint(issuer.url, exp=now - LEEWAY_S - 30))).message
    assert (await check.verify(mint(issuer.url, exp=now - LEEWAY_S + 30), BASE)).user_id == "alice"
    assert "not valid yet" in (await refused(check, mint(issuer.url, nbf=now + LEEWAY_S + 30))).message
    assert (await check.verify(mint(issuer.url, nbf=now + LEEWAY_S - 30), BASE)).user_id == "alice"
    assert "MissingRequiredClaimError" in (await refused(check, mint(issuer.url, exp=None))).message


@pytest.mark.parametrize(
    ("aud", "accepted"),
    [
        (BASE, True),
        (BASE + "/", True),
        ([f"{BASE}/elsewhere", "https://other.example.com", BASE], True),
        (f"{BASE}/v1/me/mcp", True),  # RFC 8707: a resource under the router
        ("https://other.example.com", False),
        (BASE + ".evil.example.com", False),  # a prefix, not a path below it
        (BASE + "evil", False),
        ([], False),
        (None, False),
        (42, False),
        ([42, None], False),
    ],
)
async def test_the_audience_is_this_router_or_a_resource_under_it(
    issuer: Issuer, http: aiohttp.ClientSession, aud: Any, accepted: bool
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    token = mint(issuer.url, aud=aud)
    if accepted:
        assert (await check.verify(token, BASE)).user_id == "alice"
    else:
        assert "another audience" in (await refused(check, token)).message


async def test_the_audience_is_the_issuers_own_then_the_public_url_then_the_url_reached(
    issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    reached = "http://10.0.0.5:8000"
    token_for = {aud: mint(issuer.url, aud=aud) for aud in ("api://pier", "https://public.example.com", reached)}
    own = verifier(
        http, IssuerConfig(issuer=issuer.url, audience="api://pier"), public_url="https://public.example.com"
    )
    assert (await own.verify(token_for["api://pier"], reached)).user_id == "alice"
    assert "another audience" in (await refused(own, token_for["https://public.example.com"], reached)).message
    public = verifier(http, IssuerConfig(issuer=issuer.url), public_url="https://public.example.com/")
    assert (await public.verify(token_for["https://public.example.com"], reached)).user_id == "alice"
    assert "another audience" in (await refused(public, token_for[reached], reached)).message
    plain = verifier(http, IssuerConfig(issuer=issuer.url))
    assert (await plain.verify(token_for[reached], reached)).user_id == "alice"


@pytest.mark.parametrize(
    ("claims", "missing"),
    [
        ({"scope": "mcp:use profile"}, None),
        ({"scope": "profile mcp:use"}, None),
        ({"scp": ["mcp:use"]}, None),
        ({"scope": "profile"}, "mcp:use"),
        ({"scope": "mcp:usefully"}, "mcp:use"),
        ({"scp": "mcp:use"}, "mcp:use"),  # `scp` is a list or nothing
        ({}, "mcp:use"),
    ],
)
async def test_required_scopes(
    issuer: Issuer, http: aiohttp.ClientSession, claims: dict[str, Any], missing: str | None
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url, scopes=["mcp:use"]))
    token = mint(issuer.url, **claims)
    if missing is None:
        assert (await check.verify(token, BASE)).user_id == "alice"
        return
    err = await refused(check, token)
    assert (err.code, err.http_status) == ("FORBIDDEN", 403)
    assert err.details == {"reason": "insufficient_scope", "scope": "mcp:use"}
    assert missing in err.message
    assert check.scopes() == ["mcp:use"]


@pytest.mark.parametrize(
    ("claims", "user_claim", "outcome"),
    [
        ({"sub": "alice"}, "sub", "alice"),
        ({"sub": "opaque-1", "email": "bob@example.com"}, "email", "bob@example.com"),
        ({"sub": "../../etc"}, "sub", "is not a valid user id"),
        ({"sub": "a" * 129}, "sub", "is not a valid user id"),
        ({"sub": ""}, "sub", "is not a valid user id"),
        ({"sub": "alice\n"}, "sub", "is not a valid user id"),
        ({"sub": "alice"}, "email", "is not a valid user id"),  # the configured claim is missing
        ({"sub": 42}, "sub", "InvalidSubjectError"),  # PyJWT itself refuses a `sub` that is no string
    ],
)
async def test_the_user_claim_must_be_a_valid_user_id(
    issuer: Issuer, http: aiohttp.ClientSession, claims: dict[str, Any], user_claim: str, outcome: str
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url, user_claim=user_claim))
    token = mint(issuer.url, **claims)
    if " " in outcome or outcome.endswith("Error"):  # a refusal's reason
        assert outcome in (await refused(check, token)).message
    else:
        assert (await check.verify(token, BASE)).user_id == outcome


async def test_groups_come_from_the_configured_claim_and_only_as_a_list(
    issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url, groups_claim="roles"))
    assert (await check.verify(mint(issuer.url, roles=["admin"], groups=["ops"]), BASE)).groups == ("admin",)
    assert (await check.verify(mint(issuer.url, roles="admin"), BASE)).groups == ()


async def test_the_same_subject_at_two_issuers_is_two_principals(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    second = "https://second.example.com"
    check = verifier(http, IssuerConfig(issuer=issuer.url), IssuerConfig(issuer=second))
    check.issuers[second].jwks_uri = issuer.url + "/jwks"  # the second issuer publishes the same keys here
    first_id = (await check.verify(mint(issuer.url), BASE)).key_id
    assert first_id == (await check.verify(mint(issuer.url), BASE)).key_id  # stable
    assert first_id != (await check.verify(mint(second), BASE)).key_id
    assert check.authorization_servers == [issuer.url, second]


async def test_keys_are_fetched_once_and_a_new_key_at_most_every_ten_seconds(
    issuer: Issuer, http: aiohttp.ClientSession
) -> None:
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    for _ in range(3):
        await check.verify(mint(issuer.url), BASE)
    assert issuer.asked == {"discovery": 1, "jwks": 1}
    # A flood of tokens naming keys the issuer never published costs it nothing more…
    for n in range(5):
        assert "does not publish" in (await refused(check, mint(issuer.url, kid=f"unknown-{n}"))).message
    assert issuer.asked["jwks"] == 1
    # …and once the interval has passed, a key the issuer rotated in is fetched and accepted.
    issuer.keys.append(public_jwk(OTHER_RSA_KEY, "rsa-2", "RS256"))
    check.issuers[issuer.url]._fetched_at -= 10  # the interval passing, without the test waiting for it
    assert (await check.verify(mint(issuer.url, key=OTHER_RSA_KEY, kid="rsa-2"), BASE)).user_id == "alice"
    assert issuer.asked == {"discovery": 1, "jwks": 2}


async def test_a_token_without_a_kid_uses_the_issuers_only_key(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    issuer.keys = [public_jwk(RSA_KEY, "rsa-1", "RS256")]
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    assert (await check.verify(mint(issuer.url, kid=None), BASE)).user_id == "alice"
    issuer.keys.append(public_jwk(EC_KEY, "ec-1", "ES256"))
    check.issuers[issuer.url]._fetched_at -= 10
    await check.verify(mint(issuer.url, key=EC_KEY, alg="ES256", kid="ec-1"), BASE)  # now two keys
    assert "does not publish" in (await refused(check, mint(issuer.url, kid=None))).message


async def test_encryption_keys_are_never_used_to_verify(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    issuer.keys = [public_jwk(RSA_KEY, "rsa-1", "RS256", use="enc")]
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    assert "does not publish" in (await refused(check, mint(issuer.url))).message


async def test_discovery_that_names_another_issuer_yields_no_keys(issuer: Issuer, http: aiohttp.ClientSession) -> None:
    issuer.named_issuer = "https://impostor.example.com"
    check = verifier(http, IssuerConfig(issuer=issuer.url))
    assert "does not publish" in (await refused(check, mint(issuer.url))).message
    assert issuer.asked == {"discovery": 1, "jwks": 0}


@pytest.mark.parametrize(
    ("text", "jwt_like"),
    [(mint("https://x"), True), ("sk-live-1234", False), ("a.b.c", False), ("e30.e30.sig", False),
     ("eyJhbGciOiJSUzI1NiJ9.e30.sig", True), ("x.y", False)],
)  # fmt: skip
def test_what_looks_like_a_jwt_rather_than_an_api_key(text: str, jwt_like: bool) -> None:
    assert looks_like_jwt(text) is jwt_like
