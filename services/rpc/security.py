"""Who may call whom: TLS for the router's clients, mutual TLS between pdserve processes.

    client --TLS (--tls-cert/--tls-key) + API key (router/auth.py)--> router
    router --mTLS (--internal-tls DIR)--> decode --mTLS--> prefill

Internal credentials are a directory holding `ca.crt`, `tls.crt` and `tls.key`: what a
kubernetes.io/tls Secret with its CA mounts as. Every worker port then requires a client
certificate signed by that CA (the TLS handshake refuses anyone else, before any RPC), and
every caller verifies the worker's certificate against the same CA. Peers dial each other
by IP address (from the registry), so callers check the certificate for the fixed name
INTERNAL_NAME instead of the address: an address written into Redis by someone else cannot
make a peer send anything to a server without a certificate from the CA.

The caller's identity on a worker is its certificate's common name (peer_of): a worker
scopes request ids by it, so a peer may abort or release only what it created.
`pdserve serve` makes a CA and one certificate per process (make_internal_certs), with the
instance id as common name; the CA's key is never written.

Torch-free: the router uses it too.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

INTERNAL_NAME = "pdserve-internal"  # every internal certificate carries this DNS name
CA_FILE, CERT_FILE, KEY_FILE = "ca.crt", "tls.crt", "tls.key"


@dataclass(frozen=True)
class TLSFiles:
    """PEM bytes of a certificate chain and its key, and the CA that peers' certificates chain to."""

    cert: bytes
    key: bytes
    ca: bytes | None = None

    @classmethod
    def load(cls, cert: Path, key: Path, ca: Path | None = None) -> TLSFiles:
        return cls(cert.read_bytes(), key.read_bytes(), ca.read_bytes() if ca else None)

    @classmethod
    def internal(cls, directory: Path | str) -> TLSFiles:
        d = Path(directory)
        missing = [n for n in (CA_FILE, CERT_FILE, KEY_FILE) if not (d / n).is_file()]
        if missing:
            raise FileNotFoundError(f"--internal-tls {d}: missing {', '.join(missing)}")
        return cls.load(d / CERT_FILE, d / KEY_FILE, d / CA_FILE)


def server_credentials(files: TLSFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    """TLS for a server port; with `require_client_cert`, only callers whose certificate chains
    to files.ca complete the handshake."""
    return grpc.ssl_server_credentials([(files.key, files.cert)], root_certificates=files.ca,
                                       require_client_auth=require_client_cert)


def internal_channel(address: str, files: TLSFiles | None, options: list[tuple[str, object]]) -> grpc.aio.Channel:
    """An asyncio channel to another pdserve process: mTLS with `files`, else plaintext."""
    if files is None:
        return grpc.aio.insecure_channel(address, options=options)
    creds = grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                         certificate_chain=files.cert)
    return grpc.aio.secure_channel(address, creds, options=[*options, ("grpc.ssl_target_name_override", INTERNAL_NAME)])


def internal_sync_channel(address: str, files: TLSFiles | None) -> grpc.Channel:
    """The same, blocking (start-up health checks of `pdserve serve`)."""
    if files is None:
        return grpc.insecure_channel(address)
    creds = grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                         certificate_chain=files.cert)
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", INTERNAL_NAME)])


def peer_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's certificate common name; "-" on a plaintext port (no identity to scope by)."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode(errors="replace") if names else "-"


class ApiKeys:
    """The keys clients may present as `Bearer KEY`. Compared in constant time: digests of
    equal length, every key compared, no early exit."""

    def __init__(self, keys: list[str]) -> None:
        keys = [k.strip() for k in keys if k.strip()]
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, authorization: str | None) -> bool:
        """True when `authorization` (a header or metadata value) is `Bearer <one of the keys>`."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        digest = hashlib.sha256(token.strip().encode(errors="replace")).digest()
        found = False
        for known in self._digests:
            found |= hmac.compare_digest(digest, known)
        return found and scheme.lower() == "bearer"

    @classmethod
    def gather(cls, keys: list[str], key_file: Path | None, environ: dict[str, str] = os.environ) -> ApiKeys:
        """--api-key (repeated), the lines of --api-key-file (# comments) and $PDSERVE_API_KEY."""
        gathered = list(keys)
        if key_file is not None:
            gathered += read_key_file(key_file)
        gathered.append(environ.get("PDSERVE_API_KEY", ""))
        return cls(gathered)


def read_key_file(path: Path) -> list[str]:
    """The keys of an --api-key-file: one per line; blank lines and # comments skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


# ---- making certificates --------------------------------------------------------------------------


def make_internal_certs(out: Path, names: list[str], days: int = 365) -> dict[str, Path]:
    """A fresh CA and, for each name, `out/NAME/{ca.crt,tls.crt,tls.key}` with NAME as common
    name, valid as server and as client. The CA's key stays in memory and is dropped."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("pdserve internal CA", ca_key.public_key(), ca_key, None, days, is_ca=True)
    dirs: dict[str, Path] = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(name, key.public_key(), ca_key, ca_cert, days, is_ca=False)
        dirs[name] = _write(out / name, key, cert, ca_cert)
    return dirs


def make_server_cert(out: Path, hosts: list[str], days: int = 365) -> Path:
    """A CA and a server certificate for `hosts` (names or IP addresses) in out/: ca.crt,
    tls.crt, tls.key (for trying --tls-cert locally; use a real CA's certificate in production)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("pdserve test CA", ca_key.public_key(), ca_key, None, days, is_ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(hosts[0], key.public_key(), ca_key, ca_cert, days, is_ca=False, hosts=hosts)
    return _write(out, key, cert, ca_cert)


def _certificate(name, public_key, signing_key, issuer_cert, days: int, is_ca: bool, hosts: list[str] = ()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
        return builder.add_extension(usage, critical=True).sign(signing_key, hashes.SHA256())
    alt = [x509.DNSName(INTERNAL_NAME), x509.DNSName("localhost")]
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    builder = (builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                              critical=False))
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: Path, key, cert, ca_cert) -> Path:
    from cryptography.hazmat.primitives import serialization

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    pem = serialization.Encoding.PEM
    (directory / CA_FILE).write_bytes(ca_cert.public_bytes(pem))
    (directory / CERT_FILE).write_bytes(cert.public_bytes(pem))
    key_path = directory / KEY_FILE
    key_path.touch(mode=0o600)
    key_path.write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return directory
