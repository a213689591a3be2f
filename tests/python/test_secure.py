"""TLS on the client service and bearer tokens checked against a JSON Web Key Set, with the
official client: its CA option, its extra headers."""

import datetime
import http.server
import json
import threading
import time
import urllib.error

import jwt
import polars as pl
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from polars.testing import assert_frame_equal

import polars_cloud as pc
from conftest import Cluster, free_port

ISSUER = "https://issuer.test"
AUDIENCE = "polars-node"


def certificates(tmp_path):
    """A CA (given to the client) and the server certificate it signed (for the scheduler)."""
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signing_key, ca, sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "polars-node test CA")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = build(server_name, ca_name, key.public_key(), ca_key, False, sans)
    (tmp_path / "cert.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return ca.public_bytes(serialization.Encoding.PEM)


class KeyServer:
    """Serves a JSON Web Key Set on loopback and signs tokens with its key."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="test-key", use="sig", alg="RS256")
        body = json.dumps({"keys": [jwk]}).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, issuer=ISSUER, audience=AUDIENCE, expires_in=600, key=None):
        now = datetime.datetime.now(datetime.timezone.utc)
        claims = {"sub": "alice", "iss": issuer, "aud": audience, "exp": now + datetime.timedelta(seconds=expires_in)}
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": "test-key"})


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    root = tmp_path_factory.mktemp("secure")
    cert = certificates(root)
    keys = KeyServer()
    c = Cluster(root)
    c.start_scheduler(
        tables=f"""[scheduler.client_service.connection.tls]
certificate_key_file = "{root / 'cert.pem'}"
private_key_file = "{root / 'key.pem'}"

[scheduler.client_service.auth.jwks]
url = "{keys.url}"
issuers = ["{ISSUER}"]
audience = "{AUDIENCE}"
""",
    )
    c.start_worker("worker-s", "127.0.0.7")
    try:
        c.wait_for_workers(["worker-s"])
        yield c, cert, keys
    finally:
        c.stop()
        keys.server.shutdown()


def context(secure, token=None):
    cluster, cert, _ = secure
    headers = {"authorization": f"Bearer {token}"} if token else None
    return pc.ClusterContext(
        uri=f"https://127.0.0.1:{cluster.client_port}", tls_options=pc.TLSOptions(ca_cert=cert), extra_headers=headers
    )


def test_tls_and_a_valid_token(secure):
    q = pl.LazyFrame({"a": [3, 1, 2]}).sort("a")
    result = q.remote(context(secure, secure[2].token())).execute()
    assert_frame_equal(result.head, q.collect())
    # Flight (.collect()) goes through the same checks.
    assert_frame_equal(q.remote(context(secure, secure[2].token())).collect(), q.collect())


def test_a_missing_token_is_refused(secure):
    with pytest.raises(RuntimeError, match="requires a bearer token"):
        pl.LazyFrame({"a": [1]}).remote(context(secure)).execute()


@pytest.mark.parametrize(
    "kwargs, reason",
    [
        ({"issuer": "https://elsewhere.test"}, "InvalidIssuer"),
        ({"audience": "someone-else"}, "InvalidAudience"),
        ({"expires_in": -3600}, "ExpiredSignature"),
        ({"key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}, "InvalidSignature"),
    ],
)
def test_bad_tokens_are_refused(secure, kwargs, reason):
    with pytest.raises(RuntimeError, match=f"bearer token was refused.*{reason}"):
        pl.LazyFrame({"a": [1]}).remote(context(secure, secure[2].token(**kwargs))).execute()


def test_plaintext_clients_cannot_talk_to_a_tls_port(secure):
    cluster = secure[0]
    ctx = pc.ClusterContext(uri=f"http://127.0.0.1:{cluster.client_port}")
    with pytest.raises(Exception):
        pl.LazyFrame({"a": [1]}).remote(ctx).execute()


def test_the_observatory_rest_api_requires_a_token_when_configured(tmp_path):
    import urllib.error
    import urllib.request

    keys = KeyServer()
    c = Cluster(tmp_path)
    rest = free_port("127.0.0.1")
    c.start_observatory(
        rest, tables=f'[observatory.rest_api.service.auth.jwks]\nurl = "{keys.url}"\nissuers = ["{ISSUER}"]\naudience = "{AUDIENCE}"'
    )
    base = f"http://127.0.0.1:{rest}"
    try:
        c.wait_ready(base)  # health checks stay open

        def call(path, token=None):
            request = urllib.request.Request(base + path, headers={"authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(request, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, body = call("/api/v1/queries")
        assert status == 401 and "requires a bearer token" in body, body
        status, body = call("/api/v1/queries", keys.token(issuer="https://elsewhere.test"))
        assert status == 401 and "InvalidIssuer" in body, body
        assert call("/api/v1/queries", keys.token()) == (200, '{"queries":[]}')
        assert call("/metrics")[0] == 401
        assert call("/")[0] == 200  # the page; its API calls need the token
    finally:
        c.stop()
        keys.server.shutdown()


def test_the_observatory_rest_api_over_tls(tmp_path):
    import ssl
    import urllib.request

    ca = certificates(tmp_path)
    c = Cluster(tmp_path)
    rest = free_port("127.0.0.1")
    c.start_observatory(
        rest,
        tables=f'[observatory.rest_api.service.connection.tls]\ncertificate_key_file = "{tmp_path / "cert.pem"}"\n'
        f'private_key_file = "{tmp_path / "key.pem"}"',
    )
    context = ssl.create_default_context(cadata=ca.decode())
    try:
        deadline = time.time() + 20
        while True:
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{rest}/api/v1/queries", context=context, timeout=2) as r:
                    assert r.status == 200 and json.loads(r.read()) == {"queries": []}
                    break
            except (ConnectionError, urllib.error.URLError) as e:
                if isinstance(getattr(e, "reason", None), ssl.SSLError):
                    raise
                assert time.time() < deadline, c.logs()
                time.sleep(0.2)
        # Plain HTTP on a TLS port gets nothing useful.
        with pytest.raises(Exception):
            urllib.request.urlopen(f"http://127.0.0.1:{rest}/api/v1/queries", timeout=2).read()
        assert c.procs["observatory"].poll() is None
    finally:
        c.stop()
