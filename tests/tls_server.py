"""A throwaway PostgreSQL cluster that takes only TLS, with a certificate from a CA made here.

`tls_postgres()` generates a CA and a server certificate for localhost / 127.0.0.1 (and a
second, unrelated CA), runs initdb and starts the cluster on a free port with ssl=on and a
pg_hba.conf that refuses connections without TLS. initdb and postgres refuse to run as root:
as root they are run as `postgres`.
"""

import datetime
import ipaddress
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.live_server import free_port

RUN_AS = "postgres"


@dataclass
class TlsPostgres:
    port: int
    ca_file: Path  # the CA that signed the server's certificate
    other_ca_file: Path  # a CA that did not

    def url(self, query: str, *, host: str = "127.0.0.1") -> str:
        return f"postgresql://postgres@{host}:{self.port}/postgres?{query}"


def postgres_bindir() -> Path:
    """The server binaries (Debian keeps them out of PATH, under /usr/lib/postgresql/<v>/bin)."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name)
    )
    if not versions:
        raise RuntimeError("PostgreSQL's server binaries (initdb) are not installed")
    return versions[-1].parent


@contextmanager
def tls_postgres() -> Iterator[TlsPostgres]:
    work = Path(tempfile.mkdtemp(prefix="tls-postgres-"))
    as_root = os.geteuid() == 0
    try:
        ca_key, ca_cert = _authority("todo test CA")
        _other_key, other_cert = _authority("some other CA")
        server_key, server_cert = _server_certificate(ca_key, ca_cert)
        (work / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (work / "other-ca.pem").write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
        (work / "server.crt").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        key_file = work / "server.key"
        key_file.write_bytes(
            server_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_file.chmod(0o600)
        if as_root:
            account = pwd.getpwnam(RUN_AS)
            for path in [work, *work.iterdir()]:
                os.chown(path, account.pw_uid, account.pw_gid)
        prefix = ["runuser", "-u", RUN_AS, "--"] if as_root else []
        bindir = postgres_bindir()
        data = work / "data"
        _run([*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
              "-N", "-E", "UTF8"])  # fmt: skip
        (data / "pg_hba.conf").write_text(
            "local all all trust\n"
            "hostnossl all all all reject\n"
            "hostssl all all 127.0.0.1/32 trust\n"
            "hostssl all all ::1/128 trust\n"
        )
        port = free_port()
        options = " ".join(
            [
                f"-c port={port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={work}",
                "-c ssl=on",
                f"-c ssl_cert_file={work / 'server.crt'}",
                f"-c ssl_key_file={key_file}",
                "-c fsync=off",
                "-c max_connections=20",
            ]
        )
        _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
              str(work / "log"), "-w", "-t", "30", "start"])  # fmt: skip
        try:
            yield TlsPostgres(port, work / "ca.pem", work / "other-ca.pem")
        finally:
            _run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd="/")
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed: {result.stdout}{result.stderr}")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return builder.not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(
        now + datetime.timedelta(days=1)
    )


def _authority(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(x509.CertificateBuilder())
    cert = (
        builder.subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(x509.CertificateBuilder())
    names = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ]
    cert = (
        builder.subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert
