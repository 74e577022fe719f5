"""TLS for both protocols from one certificate/key pair (and an optional client CA for mTLS).

`load_tls` checks the files before anything starts: each must exist and be readable, the certificate and
key must parse and match (`ssl.SSLContext.load_cert_chain` does both), and the client CA must parse.
Any failure is a `TlsConfigError` whose message is one line naming the file, so `rtmdet serve` can refuse
to start with it. The same bytes then feed uvicorn (an `ssl` context built from the paths) and gRPC
(`grpc.ssl_server_credentials`), so both protocols always present the same certificate.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable, malformed, or the key does not match the certificate."""


@dataclass(frozen=True)
class TlsConfig:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None
    cert_pem: bytes
    key_pem: bytes
    client_ca_pem: bytes | None

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def grpc_credentials(self):
        import grpc

        return grpc.ssl_server_credentials([(self.key_pem, self.cert_pem)], root_certificates=self.client_ca_pem,
                                           require_client_auth=self.mutual)

    def uvicorn_options(self) -> dict:
        """The keyword arguments of `uvicorn.Config` that turn HTTPS (and client verification) on."""
        opts: dict = {"ssl_certfile": str(self.cert_file), "ssl_keyfile": str(self.key_file)}
        if self.client_ca_file is not None:
            opts.update(ssl_ca_certs=str(self.client_ca_file), ssl_cert_reqs=ssl.CERT_REQUIRED)
        return opts


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path}: no such file") from None
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None


def _reason(exc: Exception) -> str:
    return " ".join(str(getattr(exc, "reason", None) or exc).split())


def load_tls(cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None) -> TlsConfig | None:
    """The checked TLS files, or None when TLS is off (no certificate, no key)."""
    if cert_file is None and key_file is None:
        if client_ca_file is not None:
            raise TlsConfigError(f"TLS client CA file {client_ca_file} given without RTMDET_TLS_CERT_FILE and "
                                 "RTMDET_TLS_KEY_FILE (mTLS needs the server's own certificate and key)")
        return None
    if cert_file is None or key_file is None:
        have, missing = (("key", "RTMDET_TLS_CERT_FILE (--tls-cert)") if cert_file is None
                         else ("certificate", "RTMDET_TLS_KEY_FILE (--tls-key)"))
        raise TlsConfigError(f"TLS {have} file {key_file or cert_file} given without {missing}")
    cert_pem = _read(cert_file, "TLS certificate file")
    key_pem = _read(key_file, "TLS key file")
    ca_pem = _read(client_ca_file, "TLS client CA file") if client_ca_file is not None else None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(str(cert_file), str(key_file))
    except ssl.SSLError as exc:
        # Tell apart a certificate that does not parse, a key that does not, and a pair that does not match.
        reason = _reason(exc)
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in reason.lower():
            raise TlsConfigError(f"TLS key file {key_file} does not match the certificate {cert_file}") from None
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=cert_pem.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError):
            raise TlsConfigError(f"TLS certificate file {cert_file}: not a PEM certificate ({reason})") from None
        raise TlsConfigError(f"TLS key file {key_file}: not a usable PEM private key for {cert_file} "
                             f"({reason})") from None
    if client_ca_file is not None:
        try:
            ctx.load_verify_locations(str(client_ca_file))
        except ssl.SSLError as exc:
            raise TlsConfigError(f"TLS client CA file {client_ca_file}: not a PEM certificate "
                                 f"({_reason(exc)})") from None
    return TlsConfig(cert_file, key_file, client_ca_file, cert_pem, key_pem, ca_pem)


def client_ssl_context(ca: str | Path | None, cert: str | Path | None, key: str | Path | None) -> ssl.SSLContext:
    """What the clients verify the server with (`ca`, else the system's roots) and present (`cert`/`key`)."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    if cert:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx
