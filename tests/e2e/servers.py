"""
Helper servers and credentials for the upstream auth, TLS and proxy tests.

- :class:`Pki`: a test CA issuing server and client certificates for
  127.0.0.1, written as PEM files;
- :func:`write_htpasswd`: a bcrypt htpasswd file for ``docker-registry``;
- :func:`write_token_signing_pair`: the RSA key and self-signed certificate
  the token issuer signs with and the registry trusts;
- :class:`ProgramProcess` and its subclasses: the small servers under
  ``programs/`` (token issuer, fake upstream with a CDN, CONNECT proxy), each
  run as ``sys.executable programs/NAME.py``, listening on 127.0.0.1 on a
  port it picks itself and reports in a ready file, recording every request
  it sees as one JSON line in a log file that the tests read.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .harness import LOCALHOST, HarnessError, json_lines, poll_until, stop_process

PROGRAMS = Path(__file__).resolve().parent / "programs"
PROGRAM_START_TIMEOUT = 15.0


# -- certificates -----------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_certificate(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    return builder.not_valid_before(start).not_valid_after(end)


@dataclass(frozen=True)
class CertificatePair:
    """A certificate and its private key, as PEM files."""

    certificate: Path
    key: Path


def write_certificate(folder: Path) -> None:
    """A self-signed certificate for 127.0.0.1: ``key.pem`` and ``cert.pem``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror test")])
    certificate = (
        _validity(x509.CertificateBuilder())
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.pem").write_bytes(_pem_key(key))
    (folder / "cert.pem").write_bytes(_pem_certificate(certificate))


class Pki:
    """
    A test certificate authority in *folder*: ``ca.pem`` (certificate) and
    the certificates it issues.
    """

    def __init__(self, folder: Path, name: str = "regmirror e2e test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._certificate = (
            _validity(x509.CertificateBuilder())
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca_path = folder / "ca.pem"
        self.ca_path.write_bytes(_pem_certificate(self._certificate))

    def issue(self, name: str, *, server: bool) -> CertificatePair:
        """
        A certificate signed by this CA: for a server on 127.0.0.1 (and
        ``localhost``) when *server*, else for a TLS client.  Written as
        ``NAME.pem`` and ``NAME-key.pem``.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            _validity(x509.CertificateBuilder())
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()
                ),
                critical=False,
            )
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.IPAddress(ipaddress.ip_address(LOCALHOST)),
                        x509.DNSName("localhost"),
                    ]
                ),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
            )
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        pair = CertificatePair(
            self.folder / f"{name}.pem", self.folder / f"{name}-key.pem"
        )
        pair.certificate.write_bytes(_pem_certificate(certificate))
        pair.key.write_bytes(_pem_key(key))
        return pair

    def skopeo_cert_dir(
        self, folder: Path, client: CertificatePair | None = None
    ) -> Path:
        """A ``--cert-dir`` for skopeo: this CA, and a client pair if given."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "ca.crt").write_bytes(self.ca_path.read_bytes())
        if client is not None:
            (folder / "client.cert").write_bytes(client.certificate.read_bytes())
            (folder / "client.key").write_bytes(client.key.read_bytes())
        return folder


def write_token_signing_pair(folder: Path) -> CertificatePair:
    """
    An RSA key and a self-signed certificate for it: the token issuer signs
    with the key and puts the certificate in each JWT's ``x5c``; the registry
    trusts the certificate as its ``rootcertbundle``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "regmirror e2e tokens")])
    certificate = (
        _validity(x509.CertificateBuilder())
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pair = CertificatePair(folder / "token-cert.pem", folder / "token-key.pem")
    pair.certificate.write_bytes(_pem_certificate(certificate))
    pair.key.write_bytes(_pem_key(key))
    return pair


def write_htpasswd(path: Path, username: str, password: str) -> Path:
    """An htpasswd file with one bcrypt entry (cost 4: fast, still bcrypt)."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{username}:{hashed.decode()}\n")
    return path


# -- helper programs --------------------------------------------------------------


class ProgramProcess:
    """
    One of the programs in ``programs/``, started with ``--ready-file`` and
    ``--log`` in *workdir*.  :meth:`start` returns once the ready file names
    its ports (bounded wait); :meth:`stop` ends it.
    """

    program: str = ""

    def __init__(self, workdir: Path, arguments: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.arguments = list(arguments)
        self.ready_path = workdir / f"{self.program}.ready"
        self.log_path = workdir / f"{self.program}.jsonl"
        self.output_path = workdir / f"{self.program}.out"
        self.ports: dict[str, int] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_path.unlink(missing_ok=True)
        self.log_path.touch()
        self._output = self.output_path.open("ab")
        self._process = subprocess.Popen(
            [
                sys.executable,
                str(PROGRAMS / f"{self.program}.py"),
                "--ready-file",
                str(self.ready_path),
                "--log",
                str(self.log_path),
                *self.arguments,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._output,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
        )
        try:
            poll_until(
                self._ready,
                timeout=PROGRAM_START_TIMEOUT,
                describe=lambda: f"{self.program} not ready:\n{self.output()}",
            )
        except BaseException:
            self.stop()
            raise
        self.ports = json.loads(self.ready_path.read_text())

    def _ready(self) -> bool:
        assert self._process is not None
        if self._process.poll() is not None:
            raise HarnessError(
                f"{self.program} exited with {self._process.returncode}:\n"
                f"{self.output()}"
            )
        return self.ready_path.exists()

    def stop(self) -> None:
        if self._process is not None:
            stop_process(self._process)
        if self._output is not None:
            self._output.close()
            self._output = None

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    def output(self) -> str:
        if not self.output_path.exists():
            return ""
        return self.output_path.read_text(errors="replace")

    def records(self) -> list[dict[str, Any]]:
        """Every request the program saw, oldest first."""
        return json_lines(self.log_path)


class TokenIssuer(ProgramProcess):
    """
    ``programs/token_issuer.py``: JWTs for ``docker-registry``'s token auth,
    for *username* / *password* only.  :meth:`records` entries hold
    ``path``, ``scopes``, ``authorization`` (was a header present), ``user``,
    ``credentials_ok`` and ``status``.
    """

    program = "token_issuer"
    issuer = "regmirror-e2e-issuer"
    service = "test-registry"

    def __init__(
        self,
        workdir: Path,
        signing: CertificatePair,
        username: str,
        password: str,
        grants: Path | None = None,
    ) -> None:
        """*grants*: the program's ``--grants`` file (users allowed per
        repository), which a test may rewrite while it runs."""
        super().__init__(
            workdir,
            [
                *(["--grants", str(grants)] if grants is not None else []),
                "--key",
                str(signing.key),
                "--cert",
                str(signing.certificate),
                "--username",
                username,
                "--password",
                password,
                "--issuer",
                self.issuer,
                "--service",
                self.service,
            ],
        )

    def realm(self, host: str = LOCALHOST) -> str:
        return f"http://{host}:{self.port}/token"

    def token_requests(self, scope: str | None = None) -> list[dict[str, Any]]:
        """Requests for ``/token``, only those asking for *scope* if given."""
        return [
            r
            for r in self.records()
            if r["path"] == "/token" and (scope is None or scope in r["scopes"])
        ]


class FakeUpstream(ProgramProcess):
    """
    ``programs/fake_upstream.py``: the twisted.web fake registry as a
    process.  ``ports["registry"]``, and ``ports["cdn"]`` with ``cdn=True``.
    :meth:`records` entries hold ``listener``, ``method``, ``path``,
    ``authorization`` and ``range`` (the headers' values or ``None``).
    The faults (*status* for paths matching *fault_path*, *drop_after*,
    *hold_after*, *stall_at*, *html_blobs*, *wrong_manifests*) are described
    in the program's docstring.
    """

    program = "fake_upstream"

    def __init__(
        self,
        workdir: Path,
        *,
        images: Sequence[tuple[str, Path]] = (),
        token: str | None = None,
        cdn: bool = False,
        status: int | None = None,
        retry_after: str | None = None,
        headers: Sequence[str] = (),
        fault_path: str | None = None,
        drop_after: int | None = None,
        hold_after: int | None = None,
        stall_at: int | None = None,
        html_blobs: bool = False,
        wrong_manifests: bool = False,
    ) -> None:
        arguments: list[str] = []
        for name, layout in images:
            arguments += ["--image", f"{name}={layout}"]
        if token is not None:
            arguments += ["--token", token]
        if cdn:
            arguments.append("--cdn")
        if status is not None:
            arguments += ["--status", str(status)]
        if retry_after is not None:
            arguments += ["--retry-after", retry_after]
        for header in headers:
            arguments += ["--header", header]
        if fault_path is not None:
            arguments += ["--fault-path", fault_path]
        if drop_after is not None:
            arguments += ["--drop-after", str(drop_after)]
        if hold_after is not None:
            arguments += ["--hold-after", str(hold_after)]
        if stall_at is not None:
            arguments += ["--stall-at", str(stall_at)]
        if html_blobs:
            arguments.append("--html-blobs")
        if wrong_manifests:
            arguments.append("--wrong-manifests")
        super().__init__(workdir, arguments)

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['registry']}"

    def requests_to(self, listener: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["listener"] == listener]


class ConnectProxy(ProgramProcess):
    """
    ``programs/connect_proxy.py``: an HTTP proxy for 127.0.0.1 targets only.
    :meth:`records` entries hold ``method``, ``target`` (``host:port`` for
    CONNECT, the absolute URL otherwise) and ``allowed``.
    """

    program = "connect_proxy"

    def __init__(self, workdir: Path, aliases: Sequence[str] = ()) -> None:
        """*aliases*: host names the proxy reaches at 127.0.0.1 too."""
        super().__init__(workdir, [f"--alias={alias}" for alias in aliases])

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.port}"


class ThrottleRelay(ProgramProcess):
    """``programs/throttle_relay.py``: 127.0.0.1:PORT slowed to *rate* B/s."""

    program = "throttle_relay"

    def __init__(self, workdir: Path, target_port: int, rate: int) -> None:
        super().__init__(
            workdir, ["--target-port", str(target_port), "--rate", str(rate)]
        )

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['relay']}"


class FlakyRelay(ProgramProcess):
    """
    ``programs/flaky_relay.py``: an HTTP relay to 127.0.0.1:PORT that
    resets the client's connection after *cut_after* bytes of every
    response body, ranged or not.  :meth:`records` entries hold
    ``method``, ``path``, ``range``, ``status``, ``sent`` and ``cut``.
    """

    program = "flaky_relay"

    def __init__(self, workdir: Path, target_port: int, cut_after: int) -> None:
        super().__init__(
            workdir, ["--target-port", str(target_port), "--cut-after", str(cut_after)]
        )

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['relay']}"

    def blob_gets(self, digest: str) -> list[dict[str, Any]]:
        """The GETs of blob *digest* it relayed, oldest first."""
        return [
            r
            for r in self.records()
            if r["method"] == "GET" and r["path"].endswith(f"/blobs/{digest}")
        ]


class DelayRelay(ProgramProcess):
    """
    ``programs/delay_relay.py``: an HTTP relay to 127.0.0.1:PORT whose
    answers take as long as :meth:`control` says, set while it runs (an
    origin that becomes slow, or silent), or are a 404 for the paths it
    names.  :meth:`records` entries hold ``method`` and ``path``, written
    as each request arrives.
    """

    program = "delay_relay"

    def __init__(self, workdir: Path, target_port: int) -> None:
        self.control_path = workdir / "delay_relay.control.json"
        super().__init__(
            workdir,
            ["--target-port", str(target_port), "--control", str(self.control_path)],
        )

    @property
    def url(self) -> str:
        return f"http://{LOCALHOST}:{self.ports['relay']}"

    def control(self, *, delay: float = 0.0, gone: str | None = None) -> None:
        """From now on, each request waits *delay* seconds before it is
        relayed; a path *gone* (a regular expression) matches is a 404."""
        partial = self.control_path.with_suffix(".partial")
        partial.write_text(json.dumps({"delay": delay, "gone": gone}))
        partial.replace(self.control_path)

    def count(self, method: str, path_suffix: str) -> int:
        """How many requests of *method* whose path ends with *path_suffix*
        arrived."""
        return sum(
            1
            for r in self.records()
            if r["method"] == method and r["path"].endswith(path_suffix)
        )
