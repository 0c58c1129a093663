"""TLS certificates and SuperNode keys of a federation, born private.

- Every private key is created 0600 with ``O_CREAT | O_EXCL`` (never a moment readable by others,
  never written through a file someone else placed there) and renamed into place; the folders
  holding keys are 0700.
- The CA's private key signs the server certificate in memory and is never written: nothing in the
  run tree can mint another certificate the nodes would trust. A leftover ``ca.key`` (written by
  older versions) is removed.
- Certificates are reused only while they are valid for at least :data:`RENEW_BEFORE` more and name
  exactly the hostnames asked for; otherwise the CA and the server certificate are made anew (the
  nodes read ``ca.crt`` again when they start).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import stat
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST = "127.0.0.1"
#: a certificate closer than this to its end is renewed before a federation starts with it
RENEW_BEFORE = dt.timedelta(days=1)


def private_dir(folder: str | Path) -> Path:
    """``folder`` created (with its parents) and made 0700: only its owner may list or open what it holds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def write_private(path: Path, data: bytes) -> None:
    """Write a secret: a fresh file created 0600 with ``O_CREAT | O_EXCL`` beside ``path``, then renamed over it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_public(path: Path, data: bytes) -> None:
    """Write a public file (a certificate, a public key): 0644, renamed into place."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _key_bytes(key: ec.EllipticCurvePrivateKey, openssh: bool = False) -> bytes:
    fmt = serialization.PrivateFormat.OpenSSH if openssh else serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def server_names(hostnames: tuple[str, ...] = ()) -> set[str]:
    """The names a server certificate is made for: localhost, 127.0.0.1 and ``hostnames``."""
    return {"localhost", HOST, *hostnames}


def _names(cert: x509.Certificate) -> set[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return set(san.get_values_for_type(x509.DNSName)) | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def reusable(paths: dict[str, Path], hostnames: tuple[str, ...] = (), now: dt.datetime | None = None) -> str | None:
    """Why the certificates at ``paths`` (``ca`` and each server's ``<name>_cert``, ``<name>_key``) cannot be
    reused (None if they can): missing, expiring within :data:`RENEW_BEFORE`, not issued by that CA, or
    naming other hosts."""
    if not all(p.exists() or p.is_symlink() for p in paths.values()):
        return "missing"
    now = now or dt.datetime.now(dt.UTC)
    try:
        ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
        certs = [x509.load_pem_x509_certificate(p.read_bytes()) for k, p in paths.items() if k.endswith("_cert")]
    except (ValueError, OSError):
        return "unreadable"
    for cert in (ca, *certs):
        if cert.not_valid_after_utc < now + RENEW_BEFORE:
            return "expired or expiring"
    for name, cert in zip((k[: -len("_cert")] for k in paths if k.endswith("_cert")), certs):
        if cert.issuer != ca.subject:
            return "not issued by this CA"
        if _names(cert) != server_names(hostnames):
            return f"made for {sorted(_names(cert))}, not {sorted(server_names(hostnames))}"
        if not _private_key_of(paths[f"{name}_key"], cert):
            return f"{paths[f'{name}_key'].name} is not this user's private 0600 file holding the certificate's key"
    return None


def is_private(path: Path) -> bool:
    """Whether ``path`` is a regular file (not a link) of this user that nobody else may read."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077 and st.st_uid == os.getuid()


def _private_key_of(path: Path, cert: x509.Certificate) -> bool:
    """Whether ``path`` is :func:`is_private` and holds ``cert``'s private key."""
    if not is_private(path):
        return False
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return False
    pem = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    return key.public_key().public_bytes(*pem) == cert.public_key().public_bytes(*pem)


def make_certificates(folder: str | Path, days: int = 30, hostnames: tuple[str, ...] = (),
                      servers: tuple[str, ...] = ("server",)) -> dict[str, Path]:
    """A CA (``ca.crt``) and, signed by it, a certificate for 127.0.0.1, localhost and ``hostnames`` per
    name in ``servers`` (``<name>.pem``, ``<name>.key``). Returns the paths: ``ca``, ``<name>_cert`` and
    ``<name>_key`` for each server, and ``cert``/``key`` for the first (the SuperLink's).

    Valid certificates for the same names are reused (restarts keep the CA the nodes trust); expired,
    expiring or differently named ones are replaced. The CA key is discarded after signing.
    """
    folder = private_dir(folder)
    paths = {"ca": folder / "ca.crt"}
    for name in servers:
        paths.update({f"{name}_cert": folder / f"{name}.pem", f"{name}_key": folder / f"{name}.key"})
    (folder / "ca.key").unlink(missing_ok=True)  # an older version's CA key: nothing may mint certificates here
    if reusable(paths, hostnames) is not None:
        _issue(paths, days, hostnames, servers)
    return {**paths, "cert": paths[f"{servers[0]}_cert"], "key": paths[f"{servers[0]}_key"]}


def _issue(paths: dict[str, Path], days: int, hostnames: tuple[str, ...], servers: tuple[str, ...]) -> None:
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fed-ser local CA {secrets.token_hex(4)}")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), *map(x509.DNSName, sorted(set(hostnames) - {HOST})),
                                       x509.IPAddress(ipaddress.ip_address(HOST))])
    for name in servers:
        key = ec.generate_private_key(ec.SECP384R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(san, critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        write_private(paths[f"{name}_key"], _key_bytes(key))
        write_public(paths[f"{name}_cert"], cert.public_bytes(serialization.Encoding.PEM))
    write_public(paths["ca"], ca.public_bytes(serialization.Encoding.PEM))  # last: the CA the new certificates need
    del ca_key  # signed; never written


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """One SuperNode key pair ``<name>.key`` / ``<name>.pub`` (EC P-384, OpenSSH format, as ``ssh-keygen -t ecdsa
    -b 384`` writes them) in the 0700 ``folder``; a pair that exists is kept."""
    folder = private_dir(folder)
    priv, pub = folder / f"{name}.key", folder / f"{name}.pub"
    if not (is_private(priv) and pub.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        write_private(priv, _key_bytes(key, openssh=True))
        write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


def make_node_keys(folder: str | Path, n: int) -> list[tuple[Path, Path]]:
    """``n`` SuperNode key pairs ``node<i>.key`` / ``node<i>.pub`` in the 0700 ``folder`` (:func:`make_node_key`)."""
    return [make_node_key(folder, f"node{i}") for i in range(n)]
