"""Tokens from identity providers: a real JSON Web Key Set served on loopback, RS256 / ES256 /
EdDSA tokens, key rotation and refresh, iss / aud, ``scp``, clock skew, algorithm confusion,
an unreachable key set, and the dev-secret hint.

What a user sees is asserted on real ``notifier serve`` processes; the finer cases on the
authority itself or through TestClient. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from conftest import SECRET, make_settings, mint_token
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi.testclient import TestClient
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pydantic import SecretStr
from support import Instance, free_port, hello, recv, wait_until
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from notifier.app import create_app
from notifier.auth import DEV_SECRET_HINT, LEEWAY, TokenAuthority, UnknownKey
from notifier.cli import main
from notifier.errors import AuthError
from notifier.jwks import KeySet
from notifier.settings import ConfigError, load_settings

ISSUER = "https://idp.example/realms/acme"
AUDIENCE = "notifier"
URL = "/v1/notifications"
DEADLINE = 10.0


# -- an identity provider: keys, tokens, and a JWKS server on loopback ------------------------------


@dataclass
class Signer:
    """One private key of the identity provider, and the public JWK it publishes."""

    kid: str
    alg: str
    private: Any
    jwk: dict[str, Any]

    def token(self, ttl: float = 3600, headers: dict[str, Any] | None = None, **claims: Any) -> str:
        payload = {"sub": "alice", "scope": "subscribe publish", "exp": int(time.time() + ttl), **claims}
        return jwt.encode(
            payload, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})}
        )

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def rsa_signer(kid: str, bits: int = 2048) -> Signer:
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    jwk = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return Signer(kid, "RS256", private, {**jwk, "kid": kid, "use": "sig"})  # no "alg", as Entra ID


def ec_signer(kid: str, curve: ec.EllipticCurve | None = None) -> Signer:
    private = ec.generate_private_key(curve or ec.SECP256R1())
    jwk = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    alg = "ES256" if curve is None else "ES384"
    return Signer(kid, alg, private, {**jwk, "kid": kid, "alg": alg, "use": "sig"})


def ed_signer(kid: str) -> Signer:
    private = ed25519.Ed25519PrivateKey.generate()
    jwk = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return Signer(kid, "EdDSA", private, {**jwk, "kid": kid, "alg": "EdDSA"})


@dataclass
class Keys:
    rsa: Signer
    ec: Signer
    ed: Signer
    rotated: Signer  # the key the provider rotates to


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(rsa_signer("rsa-1"), ec_signer("ec-1"), ed_signer("ed-1"), rsa_signer("rsa-2"))


class IdP:
    """A JWKS endpoint on a free loopback port: serves ``document`` with ``status``, counts GETs."""

    def __init__(self) -> None:
        self.document: bytes = b'{"keys": []}'
        self.status = 200
        self.requests = 0
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                idp.requests += 1
                body = idp.document
                self.send_response(idp.status)
                if idp.status in (301, 302):
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/protocol/openid-connect/certs"

    def publish(self, *items: Signer | dict[str, Any]) -> None:
        """Serve a key set of these keys (a Signer's public JWK, or a raw JWK)."""
        jwks = [item.jwk if isinstance(item, Signer) else item for item in items]
        self.document = json.dumps({"keys": jwks}).encode()


@pytest.fixture
def idp() -> Iterator[IdP]:
    server = IdP()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()
        server.thread.join(5)


def unreachable_url() -> str:
    return f"http://127.0.0.1:{free_port()}/jwks"  # nothing listens there


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(secret: bytes, kid: str | None = None, **claims: Any) -> str:
    """An HS256 token "signed" with ``secret`` (a public key, say) by hand: PyJWT refuses to."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    payload = {"sub": "mallory", "scope": "subscribe publish", "exp": int(time.time()) + 3600, **claims}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def authority(idp: IdP, keys: Keys) -> Any:
    """A JWKS-only authority on the provider serving the RSA, EC and Ed25519 keys, started."""
    idp.publish(keys.rsa, keys.ec, keys.ed)
    started = TokenAuthority(None, KeySet(idp.url))
    await started.start()
    yield started
    await started.close()


async def refused(authority: TokenAuthority, token: str) -> str:
    with pytest.raises(AuthError) as caught:
        await authority.authenticate(token)
    return str(caught.value)


# -- verification with the key set ---------------------------------------------------------------


@pytest.mark.anyio
async def test_rs256_es256_and_eddsa_tokens_verify_with_the_key_their_kid_names(
    authority: TokenAuthority, keys: Keys
) -> None:
    now = int(time.time())
    for signer in (keys.rsa, keys.ec, keys.ed):
        principal = await authority.authenticate(signer.token(sub=f"user-{signer.kid}", iat=now))
        assert principal.sub == f"user-{signer.kid}"
        assert principal.scopes == {"subscribe", "publish"}
        assert principal.iat == now


@pytest.mark.anyio
async def test_a_token_signed_by_another_key_under_a_known_kid_is_refused(
    authority: TokenAuthority, keys: Keys
) -> None:
    impostor = rsa_signer(keys.rsa.kid)
    assert "Signature verification failed" in await refused(authority, impostor.token())


@pytest.mark.anyio
async def test_a_token_without_kid_is_refused_saying_so(authority: TokenAuthority, keys: Keys) -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, keys.rsa.private, algorithm="RS256")
    assert "'kid'" in await refused(authority, token)


@pytest.mark.anyio
async def test_a_new_kid_refetches_the_set_once_however_many_tokens_name_unknown_kids(
    idp: IdP, authority: TokenAuthority, keys: Keys
) -> None:
    assert idp.requests == 1  # fetched at start
    idp.publish(keys.rotated, keys.ec, keys.ed)  # the provider rotates its RSA key
    unknown = [keys.rsa.token(headers={"kid": f"made-up-{i}"}) for i in range(30)]
    results = await asyncio.gather(
        authority.authenticate(keys.rotated.token(sub="rotated")),
        *(authority.authenticate(token) for token in unknown),
        return_exceptions=True,
    )
    first, *others = results
    assert not isinstance(first, BaseException) and first.sub == "rotated"
    assert all(isinstance(r, AuthError) and "no key 'made-up-" in str(r) for r in others)
    assert idp.requests == 2  # one fetch, shared by all 31 tokens
    for token in unknown[:10]:  # within the 10 s that follow: no fetch at all
        assert "no key" in await refused(authority, token)
    assert idp.requests == 2


@pytest.mark.anyio
async def test_an_unknown_kid_refetches_again_once_the_refetch_interval_has_passed(
    idp: IdP, keys: Keys
) -> None:
    idp.publish(keys.rsa)
    authority = TokenAuthority(None, KeySet(idp.url, refetch_interval=0.3))
    await authority.start()
    try:
        stranger = keys.rsa.token(headers={"kid": "stranger"})
        assert "no key 'stranger'" in await refused(authority, stranger)
        assert idp.requests == 2
        deadline = time.monotonic() + DEADLINE
        while idp.requests < 3:
            assert time.monotonic() < deadline, "no refetch after the interval"
            assert idp.requests == 2  # refused at once, without a fetch, until then
            await refused(authority, stranger)
            await asyncio.sleep(0.02)
    finally:
        await authority.close()


@pytest.mark.anyio
async def test_the_set_is_refetched_every_refresh_interval_and_a_withdrawn_key_stops_verifying(
    idp: IdP, keys: Keys
) -> None:
    idp.publish(keys.rsa)
    authority = TokenAuthority(None, KeySet(idp.url, refresh_interval=0.2))
    await authority.start()
    try:
        old = keys.rsa.token()
        assert authority.verify(old).sub == "alice"  # verified, and remembered
        idp.publish(keys.rotated)
        new = keys.rotated.token(sub="bob")
        deadline = time.monotonic() + DEADLINE
        while True:  # verify() never fetches: only the periodic refresh can bring the new key
            try:
                assert authority.verify(new).sub == "bob"
                break
            except UnknownKey:
                assert time.monotonic() < deadline, "the set was not refreshed"
                await asyncio.sleep(0.02)
        with pytest.raises(UnknownKey, match="no key 'rsa-1'"):
            authority.verify(old)
    finally:
        await authority.close()


@pytest.mark.anyio
async def test_broken_and_unsupported_keys_are_skipped_and_broken_ones_logged(
    idp: IdP, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    p384 = ec_signer("ec-384", ec.SECP384R1())
    small = rsa_signer("rsa-1024", bits=1024)
    broken = {**keys.rotated.jwk, "kid": "broken", "n": "!!not base64!!"}
    idp.publish(
        broken,
        small,
        p384,
        {"kty": "oct", "kid": "hmac", "k": b64(b"x" * 32)},
        {**keys.rotated.jwk, "kid": "enc", "use": "enc", "alg": "RSA-OAEP"},
        {**keys.rotated.jwk, "kid": None},
        "not a key",
        keys.rsa,
        keys.ed,
    )
    authority = TokenAuthority(None, KeySet(idp.url))
    with caplog.at_level(logging.WARNING, logger="notifier.jwks"):
        await authority.start()
    try:
        for signer in (keys.rsa, keys.ed):
            assert (await authority.authenticate(signer.token())).sub == "alice"
        warnings = " ".join(r.getMessage() for r in caplog.records if r.name == "notifier.jwks")
        assert "'broken'" in warnings and "1024 bits" in warnings and "not a JSON object" in warnings
        assert "ec-384" not in warnings  # a valid key of a kind not taken is not worth a warning
        assert "'ES384' is not accepted" in await refused(authority, p384.token())
    finally:
        await authority.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "document", "problem"),
    [
        (500, b"{}", "HTTP 500"),
        (302, b"", "redirects are not followed"),
        (200, b"<html>", "not JSON"),
        (200, b'{"keys": {}}', "no 'keys' list"),
        (200, b'{"keys": [{"kty": "oct", "kid": "h", "k": "eA"}]}', "no usable key"),
        (200, b'{"keys": [], "padding": "' + b"x" * (1 << 20) + b'"}', "over 1048576 bytes"),
    ],
)
async def test_a_bad_answer_keeps_the_keys_fetched_before_and_is_logged(
    idp: IdP, keys: Keys, caplog: pytest.LogCaptureFixture, status: int, document: bytes, problem: str
) -> None:
    idp.publish(keys.rsa)
    authority = TokenAuthority(None, KeySet(idp.url, refetch_interval=0))
    await authority.start()
    try:
        idp.status, idp.document = status, document
        with caplog.at_level(logging.WARNING, logger="notifier.jwks"):
            assert "no key 'other'" in await refused(authority, keys.rsa.token(headers={"kid": "other"}))
        assert idp.requests == 2
        assert any(problem in r.getMessage() and idp.url in r.getMessage() for r in caplog.records)
        assert (await authority.authenticate(keys.rsa.token())).sub == "alice"  # still cached
    finally:
        await authority.close()


# -- iss, aud, scp, clock skew -----------------------------------------------------------------


@pytest.mark.anyio
async def test_iss_must_equal_the_issuer_and_aud_contain_the_audience(idp: IdP, keys: Keys) -> None:
    idp.publish(keys.rsa)
    authority = TokenAuthority(SECRET, KeySet(idp.url), issuer=ISSUER, audience=AUDIENCE)
    await authority.start()
    try:
        for token in (
            keys.rsa.token(iss=ISSUER, aud=AUDIENCE),
            keys.rsa.token(iss=ISSUER, aud=["account", AUDIENCE]),
            mint_token(iss=ISSUER, aud=[AUDIENCE]),  # HS256 tokens are held to them too
        ):
            assert (await authority.authenticate(token)).sub == "alice"
        assert "'iss' must be" in await refused(authority, keys.rsa.token(iss=ISSUER + "/", aud=AUDIENCE))
        assert "'iss' claim is required" in await refused(authority, keys.rsa.token(aud=AUDIENCE))
        assert "'aud' must" in await refused(authority, keys.rsa.token(iss=ISSUER, aud=["account"]))
        assert "'aud' claim is required" in await refused(authority, keys.rsa.token(iss=ISSUER))
        assert "'aud' claim is required" in await refused(authority, mint_token(iss=ISSUER))
    finally:
        await authority.close()


def test_without_issuer_and_audience_settings_any_iss_and_aud_are_taken() -> None:
    principal = TokenAuthority(SECRET).verify(mint_token(iss="anyone", aud=["any", "app"]))
    assert principal.sub == "alice"


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scp": ["subscribe", "publish"]}, {"subscribe", "publish"}),
        ({"scp": "publish subscribe"}, {"subscribe", "publish"}),  # Entra ID sends a string
        ({"scp": "publish", "scope": "openid subscribe"}, {"openid", "subscribe", "publish"}),
        ({"scp": []}, set()),
    ],
)
def test_scp_grants_scopes_as_scope_does(claims: dict[str, Any], scopes: set[str]) -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")
    assert TokenAuthority(SECRET).verify(token).scopes == scopes


@pytest.mark.parametrize("scp", [7, ["publish", 3], {"publish": True}])
def test_a_badly_typed_scp_is_refused(scp: Any) -> None:
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60, "scp": scp}, SECRET, algorithm="HS256")
    with pytest.raises(AuthError, match="'scp'"):
        TokenAuthority(SECRET).verify(token)


@pytest.mark.parametrize(
    ("offsets", "taken"),
    [
        ({"exp": -(LEEWAY - 1)}, True),
        ({"exp": -(LEEWAY + 1)}, False),
        ({"nbf": LEEWAY - 1}, True),
        ({"nbf": LEEWAY + 2}, False),
        ({"iat": LEEWAY - 1}, True),
        ({"iat": LEEWAY + 2}, False),
    ],
)
def test_five_seconds_of_clock_skew_are_allowed_on_exp_nbf_and_iat_and_no_more(
    offsets: dict[str, int], taken: bool
) -> None:
    now = int(time.time())
    claims = {"sub": "alice", "exp": now + 3600, **{k: now + v for k, v in offsets.items()}}
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    if taken:
        assert TokenAuthority(SECRET).verify(token).sub == "alice"
    else:
        with pytest.raises(AuthError):
            TokenAuthority(SECRET).verify(token)


# -- algorithm confusion -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("with_secret", [True, False])
async def test_algorithm_confusion_is_refused(idp: IdP, keys: Keys, with_secret: bool) -> None:
    idp.publish(keys.rsa, keys.ec)
    authority = TokenAuthority(SECRET if with_secret else None, KeySet(idp.url))
    await authority.start()
    try:
        now = {"exp": int(time.time()) + 3600}
        attacks = {
            "HS256 keyed with the public key's PEM": forged_hs256(keys.rsa.public_pem, keys.rsa.kid),
            "HS256 keyed with the PEM, no kid": forged_hs256(keys.rsa.public_pem),
            "HS256 keyed with the JWK": forged_hs256(json.dumps(keys.rsa.jwk).encode(), keys.rsa.kid),
            "alg none": jwt.encode(
                {"sub": "mallory", **now}, None, algorithm="none", headers={"kid": keys.rsa.kid}
            ),
            "ES256 under an RSA kid": keys.ec.token(headers={"kid": keys.rsa.kid}),
            "RS256 under an EC kid": keys.rsa.token(headers={"kid": keys.ec.kid}),
        }
        for name, token in attacks.items():
            with pytest.raises(AuthError):
                await authority.authenticate(token)
                pytest.fail(f"{name}: taken")
        detail = await refused(authority, attacks["ES256 under an RSA kid"])
        assert "verifies RS256, not ES256" in detail
        if not with_secret:
            assert "'HS256' is not accepted" in await refused(authority, attacks["HS256 keyed with the JWK"])
    finally:
        await authority.close()


def test_an_authority_without_a_key_set_refuses_asymmetric_tokens(keys: Keys) -> None:
    with pytest.raises(AuthError, match="'RS256' is not accepted"):
        TokenAuthority(SECRET).verify(keys.rsa.token())


# -- through the HTTP edge (TestClient) ------------------------------------------------------------


def test_an_unreachable_key_set_gives_401_naming_it_and_hs256_tokens_still_work(
    keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    url = unreachable_url()
    with caplog.at_level(logging.WARNING), TestClient(create_app(make_settings(jwks_url=url))) as client:
        lines = [r.getMessage() for r in caplog.records if r.name == "notifier.jwks"]
        assert len(lines) == 1 and url in lines[0]  # one line, naming the URL and the reason
        refused = client.post(URL, json={"topic": "news", "data": 1}, headers=auth(keys.rsa.token()))
        assert refused.status_code == 401
        assert (
            refused.json()["detail"] == f"cannot verify the token: the key set {url} could not be fetched yet"
        )
        taken = client.post(URL, json={"topic": "news", "data": 1}, headers=auth(mint_token()))
        assert taken.status_code == 202


def test_claims_checks_answer_401_and_scp_grants_publishing(idp: IdP, keys: Keys) -> None:
    idp.publish(keys.ec)
    settings = make_settings(jwt_secret=None, jwks_url=idp.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE)
    with TestClient(create_app(settings)) as client:

        def post(token: str) -> httpx.Response:
            return client.post(URL, json={"topic": "news", "data": 1}, headers=auth(token))

        good = {"iss": ISSUER, "aud": [AUDIENCE, "account"]}
        assert post(keys.ec.token(**good)).status_code == 202
        assert post(keys.ec.token(scope=None, scp="publish", **good)).status_code == 202
        assert post(keys.ec.token(scope=None, scp=["subscribe"], **good)).status_code == 403
        wrong_iss = post(keys.ec.token(iss="https://evil.example", aud=AUDIENCE))
        assert (wrong_iss.status_code, wrong_iss.headers["www-authenticate"]) == (401, "Bearer")
        assert wrong_iss.json()["detail"] == f"invalid token: 'iss' must be {ISSUER!r}"
        no_aud = post(keys.ec.token(iss=ISSUER))
        assert (no_aud.status_code, no_aud.json()["detail"]) == (
            401,
            "invalid token: the 'aud' claim is required",
        )
        hs256 = post(mint_token(**good))  # no secret configured: HS256 is not taken at all
        assert hs256.status_code == 401 and "'HS256' is not accepted" in hs256.json()["detail"]
        with client.websocket_connect(f"/v1/ws?token={keys.ec.token(**good)}") as ws:
            assert recv(ws)["type"] == "hello"


def test_a_refresh_frame_with_a_token_from_the_key_set_extends_the_session(idp: IdP, keys: Keys) -> None:
    idp.publish(keys.rsa, keys.ed)
    with TestClient(create_app(make_settings(jwt_secret=None, jwks_url=idp.url))) as client:
        with client.websocket_connect(f"/v1/ws?token={keys.rsa.token(ttl=600)}") as ws:
            assert recv(ws)["type"] == "hello"
            ws.send_json({"type": "refresh", "token": keys.ed.token(ttl=7200), "ref": 1})
            assert recv(ws)["type"] == "refreshed"


def test_the_dev_secret_hint_is_added_to_a_bad_signature_only() -> None:
    dev = TokenAuthority(SECRET, dev_secret=True)
    with pytest.raises(AuthError) as caught:
        dev.verify(mint_token(secret="another-secret-0123456789abcdef0123456789"))
    assert str(caught.value) == f"invalid token: Signature verification failed; {DEV_SECRET_HINT}"
    with pytest.raises(AuthError) as caught:
        dev.verify(mint_token(ttl=-60))
    assert str(caught.value) == "token expired"
    with pytest.raises(AuthError) as caught:
        TokenAuthority(SECRET).verify(mint_token(secret="another-secret-0123456789abcdef0123456789"))
    assert DEV_SECRET_HINT not in str(caught.value)


# -- settings and the token command ------------------------------------------------------------------


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("NOTIFIER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    return tmp_path


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("NOTIFIER_JWKS_URL", "ftp://idp.example/jwks", "https://"),
        ("NOTIFIER_JWKS_URL", "http://idp.example/jwks", "http:// only for a provider on this host"),
        ("NOTIFIER_JWKS_URL", "https:///jwks", "names no host"),
        ("NOTIFIER_JWT_ISSUER", " ", "must not be empty"),
        ("NOTIFIER_JWT_AUDIENCE", "", "must not be empty"),
    ],
)
def test_bad_identity_provider_settings_fail_naming_the_variable(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value).startswith(f"{variable}:") and message in str(caught.value)


def test_token_sets_iss_and_aud_when_they_are_configured(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_JWT_SECRET", SECRET)
    monkeypatch.setenv("NOTIFIER_JWT_ISSUER", ISSUER)
    monkeypatch.setenv("NOTIFIER_JWT_AUDIENCE", AUDIENCE)
    assert main(["token", "--sub", "bob", "--scope", "publish"]) == 0
    token = capsys.readouterr().out.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert (claims["iss"], claims["aud"], claims["sub"]) == (ISSUER, AUDIENCE, "bob")
    assert abs(claims["iat"] - time.time()) <= 5


def test_token_without_a_secret_in_a_jwks_deployment_fails_with_one_line(
    clean_environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NOTIFIER_JWKS_URL", "https://idp.example/jwks")
    assert main(["token", "--sub", "bob"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and "NOTIFIER_JWT_SECRET" in out.err and "identity provider" in out.err


# -- real `notifier serve` processes -----------------------------------------------------------------


@pytest.fixture
def instances() -> Iterator[list[Instance]]:
    started: list[Instance] = []
    yield started
    for instance in started:
        instance.stop()
        print(f"--- {instance.url} log ---", instance.output(), sep="\n")
        os.unlink(instance.log.name)


def serve(instances: list[Instance], **env: str) -> Instance:
    """A real instance with exactly these NOTIFIER_* variables (none inherited), memory broker."""
    instance = Instance({"NOTIFIER_BROKER_URL": "memory://", "NOTIFIER_SHUTDOWN_TIMEOUT": "2", **env})
    own = {"NOTIFIER_PORT", "NOTIFIER_HOST", "NOTIFIER_BROKER_URL", "NOTIFIER_SHUTDOWN_TIMEOUT", *env}
    instance.env = {k: v for k, v in instance.env.items() if not k.startswith("NOTIFIER_") or k in own}
    instances.append(instance)
    return instance.start()


def publish(instance: Instance, token: str) -> httpx.Response:
    body = {"topic": "news", "data": {"n": 1}}
    return httpx.post(instance.url + URL, json=body, headers=auth(token), timeout=DEADLINE)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_served_instance_takes_rs256_es256_and_eddsa_tokens_from_the_identity_provider(
    idp: IdP, keys: Keys, instances: list[Instance]
) -> None:
    idp.publish(keys.rsa, keys.ec, keys.ed)
    env = {"NOTIFIER_JWKS_URL": idp.url, "NOTIFIER_JWT_ISSUER": ISSUER, "NOTIFIER_JWT_AUDIENCE": AUDIENCE}
    server = serve(instances, **env)
    assert "dev token" not in server.output()  # a key set and no secret: no generated secret
    for signer in (keys.rsa, keys.ec, keys.ed):
        token = signer.token(sub=f"user-{signer.alg}", iss=ISSUER, aud=AUDIENCE)
        assert publish(server, token).status_code == 202, signer.alg
        async with connect(f"{server.ws_url}?token={token}", open_timeout=DEADLINE) as ws:
            assert (await hello(ws, DEADLINE))["user"] == f"user-{signer.alg}"
    hs256 = publish(server, mint_token(iss=ISSUER, aud=AUDIENCE))
    assert hs256.status_code == 401 and "'HS256' is not accepted" in hs256.json()["detail"]
    with pytest.raises(InvalidStatus) as caught:
        async with connect(f"{server.ws_url}?token={keys.rsa.token()}", open_timeout=DEADLINE):
            pass
    assert caught.value.response.status_code == 403
    assert b"'iss' claim is required" in caught.value.response.body


@pytest.mark.slow
def test_a_served_instance_follows_a_key_rotation_with_one_fetch(
    idp: IdP, keys: Keys, instances: list[Instance]
) -> None:
    idp.publish(keys.rsa)
    server = serve(instances, NOTIFIER_JWKS_URL=idp.url, NOTIFIER_JWT_AUDIENCE=AUDIENCE)
    assert idp.requests == 1
    assert publish(server, keys.rsa.token(aud=AUDIENCE)).status_code == 202
    idp.publish(keys.rotated)
    assert publish(server, keys.rotated.token(aud=AUDIENCE)).status_code == 202
    assert idp.requests == 2
    for i in range(20):  # made-up kids within the next 10 s: refused without asking the provider
        answer = publish(server, keys.rotated.token(aud=AUDIENCE, headers={"kid": f"guess-{i}"}))
        assert answer.status_code == 401
        assert answer.json()["detail"] == f"invalid token: no key 'guess-{i}' in the key set {idp.url}"
    assert idp.requests == 2


@pytest.mark.slow
def test_a_served_instance_with_an_unreachable_key_set_logs_it_and_serves_hs256_tokens(
    keys: Keys, instances: list[Instance]
) -> None:
    url = unreachable_url()
    server = serve(instances, NOTIFIER_JWKS_URL=url, NOTIFIER_JWT_SECRET=SECRET)
    wait_until(lambda: f"cannot fetch the key set {url}" in server.output(), DEADLINE, "the log line")
    refused = publish(server, keys.rsa.token())
    assert refused.status_code == 401
    assert refused.json()["detail"] == f"cannot verify the token: the key set {url} could not be fetched yet"
    assert publish(server, mint_token()).status_code == 202


@pytest.mark.slow
def test_a_served_instance_on_a_generated_secret_says_so_to_a_token_it_cannot_verify(
    instances: list[Instance],
) -> None:
    server = serve(instances)
    assert "dev token" in server.output()
    earlier_run = mint_token(secret=secrets.token_urlsafe(32))
    refused = publish(server, earlier_run)
    assert refused.status_code == 401
    assert refused.json()["detail"] == f"invalid token: Signature verification failed; {DEV_SECRET_HINT}"
    assert "earlier run" in DEV_SECRET_HINT and "NOTIFIER_JWT_SECRET" in DEV_SECRET_HINT


def test_settings_secret_is_not_needed_with_a_key_set() -> None:
    app = create_app(make_settings(jwt_secret=None, jwks_url="https://idp.example/jwks"))
    assert app.state.services.authority.keys is not None
    with pytest.raises(ConfigError, match="NOTIFIER_JWT_SECRET"):
        create_app(make_settings(jwt_secret=None))
    assert make_settings(jwt_secret=SecretStr(SECRET)).jwks_url is None
