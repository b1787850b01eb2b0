"""The device CA: sign a device's CSR, or make a key pair and certificate for it.

Pure functions over `cryptography` objects and PEM bytes; only `load_ca_files` touches the disk.
The certificate's CN is the device's broker identity (RabbitMQ `ssl_cert_login_from =
common_name`), so the subject is always forced to `CN=<device id>`, whatever a CSR asks for.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app.errors import InvalidInput
from swarm_device.protocol import DEVICE_ID_RE

CaPrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

MIN_RSA_BITS = 2048
# Curves every TLS stack on the path (OpenSSL on devices, Erlang/OTP in RabbitMQ) accepts.
ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
# Tolerates device clocks that run a little behind the core's.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    private_key: CaPrivateKey


def load_ca(cert_pem: bytes, key_pem: bytes) -> CertificateAuthority:
    """Load the CA from PEM bytes; refuses a key that is not the certificate's or a non-CA certificate.

    Raises ValueError (TypeError for a key type other than EC or RSA): a broken CA is a deployment
    error, not a client's.
    """
    certificate = x509.load_pem_x509_certificate(cert_pem)
    private_key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(private_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"CA key type {type(private_key).__name__} is not supported (EC or RSA only)")
    if private_key.public_key() != certificate.public_key():
        raise ValueError("the CA private key does not belong to the CA certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError("the CA certificate lacks basicConstraints CA:TRUE")
    return CertificateAuthority(certificate=certificate, private_key=private_key)


def load_ca_files(cert_path: Path | str, key_path: Path | str) -> CertificateAuthority:
    """Read the CA certificate and its (unencrypted) key from PEM files."""
    return load_ca(Path(cert_path).read_bytes(), Path(key_path).read_bytes())


def sign_device_csr(ca: CertificateAuthority, csr_pem: bytes, device_id: str, days: int) -> x509.Certificate:
    """Sign a device's CSR as a client certificate for `device_id`.

    Only the CSR's public key is used: its subject and requested extensions are ignored.
    Raises InvalidInput for a bad device id, unparseable PEM, a CSR whose signature does not match
    its own key (tampered, or not proof of possession) and weak or unsupported keys.
    """
    _check_device_id(device_id)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidInput(f"the CSR is not a valid PEM certificate signing request: {exc}") from exc
    try:
        public_key = csr.public_key()
        signature_ok = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(f"the CSR's key or signature algorithm is not supported: {exc}") from exc
    if not signature_ok:
        raise InvalidInput("the CSR's signature does not verify with the public key it carries")
    return _device_certificate(ca, public_key, device_id, days)


def issue_device_credentials(ca: CertificateAuthority, device_id: str, days: int) -> tuple[bytes, x509.Certificate]:
    """Make an EC P-256 key for the device and its certificate: (PKCS#8 PEM key, certificate)."""
    _check_device_id(device_id)
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = _device_certificate(ca, key.public_key(), device_id, days)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, certificate


def certificate_pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def common_name(certificate: x509.Certificate) -> str | None:
    """The subject's CN (the broker user name of a certificate login), or None without one."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def serial_hex(certificate: x509.Certificate) -> str:
    """The serial number as lowercase hex without leading zeros (as openssl prints it, lowercased)."""
    return format(certificate.serial_number, "x")


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    """SHA-256 over the DER certificate, lowercase hex without separators."""
    return certificate.fingerprint(hashes.SHA256()).hex()


def _check_device_id(device_id: str) -> None:
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise InvalidInput(f"device id {device_id!r} must match {DEVICE_ID_RE.pattern}")


def _check_device_key(public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise InvalidInput(f"RSA key of {public_key.key_size} bits refused: at least {MIN_RSA_BITS} required")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ALLOWED_CURVES:
            raise InvalidInput(f"EC curve {public_key.curve.name} refused: use one of {sorted(ALLOWED_CURVES)}")
    else:
        raise InvalidInput(f"key type {type(public_key).__name__} refused: use EC (P-256/384/521) or RSA")


def _device_certificate(
    ca: CertificateAuthority, public_key: CertificatePublicKeyTypes, device_id: str, days: int
) -> x509.Certificate:
    """The one builder of device certificates, for signed CSRs and generated keys alike."""
    _check_device_key(public_key)
    if days < 1:
        raise InvalidInput(f"certificate validity must be at least 1 day, got {days}")
    now = dt.datetime.now(dt.UTC)
    # A certificate cannot be trusted past its issuer's expiry, so it should not claim to be.
    not_after = min(now + dt.timedelta(days=days), ca.certificate.not_valid_after_utc)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .issuer_name(ca.certificate.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        # RabbitMQ 4.x binds the MQTT client id to the first DNS SAN (mqtt.ssl_cert_client_id_from).
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(device_id)]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca), critical=False)
    )
    return builder.sign(ca.private_key, hashes.SHA256())


def _authority_key_identifier(ca: CertificateAuthority) -> x509.AuthorityKeyIdentifier:
    # Reuse the CA's own SKI when it has one, so that the AKI matches it byte for byte.
    try:
        ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
