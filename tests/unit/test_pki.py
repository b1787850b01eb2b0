"""The device CA: forced subject, client-auth profile, refusals of bad or weak CSRs."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from app import pki
from app.errors import InvalidInput


def _make_ca(lifetime: dt.timedelta = dt.timedelta(days=3650)) -> pki.CertificateAuthority:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Swarm Test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Through the public loader, so that it is exercised as well.
    return pki.load_ca(cert_pem, key_pem)


@pytest.fixture(scope="module")
def ca() -> pki.CertificateAuthority:
    return _make_ca()


def _csr(key: CertificateIssuerPrivateKeyTypes, cn: str = "someone-else") -> x509.CertificateSigningRequest:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def _pem(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.PEM)


def _verify_signed_by(cert: x509.Certificate, ca: pki.CertificateAuthority) -> None:
    ca_public = ca.certificate.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def test_csr_subject_is_forced_to_the_device_id(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_device_csr(ca, _pem(_csr(key, cn="dev-admin")), "dev-7", days=30)

    assert cert.subject == x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-7")])
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key() == key.public_key()


def test_signed_certificate_has_the_client_profile(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_device_csr(ca, _pem(_csr(key)), "dev-7", days=30)

    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    # The CSR asked for CA:TRUE; requested extensions must be ignored.
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert not usage.key_encipherment
    assert not usage.key_cert_sign
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)


def test_validity_window(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    cert = pki.sign_device_csr(ca, _pem(_csr(key)), "dev-7", days=30)

    assert before - dt.timedelta(minutes=5, seconds=2) <= cert.not_valid_before_utc <= before - dt.timedelta(minutes=4)
    assert abs(cert.not_valid_after_utc - (before + dt.timedelta(days=30))) < dt.timedelta(seconds=5)


def test_validity_never_outlives_the_ca() -> None:
    short_ca = _make_ca(lifetime=dt.timedelta(days=10))
    _, cert = pki.issue_device_credentials(short_ca, "dev-7", days=825)

    assert cert.not_valid_after_utc == short_ca.certificate.not_valid_after_utc


def test_signature_verifies_with_the_ca_key(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = pki.sign_device_csr(ca, _pem(_csr(key)), "dev-7", days=30)

    _verify_signed_by(cert, ca)
    cert.verify_directly_issued_by(ca.certificate)


def test_serials_are_random(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr_pem = _pem(_csr(key))
    first = pki.sign_device_csr(ca, csr_pem, "dev-7", days=30)
    second = pki.sign_device_csr(ca, csr_pem, "dev-7", days=30)

    assert first.serial_number != second.serial_number
    assert pki.serial_hex(first) == format(first.serial_number, "x")
    assert pki.serial_hex(first) == pki.serial_hex(first).lower()


def test_rsa_2048_csr_gets_key_encipherment(ca: pki.CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = pki.sign_device_csr(ca, _pem(_csr(key)), "dev-rsa", days=30)

    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature
    assert usage.key_encipherment
    _verify_signed_by(cert, ca)


@pytest.mark.parametrize(
    "garbage", [b"", b"not a csr", b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"]
)
def test_bad_pem_is_invalid_input(ca: pki.CertificateAuthority, garbage: bytes) -> None:
    with pytest.raises(InvalidInput, match="not a valid PEM"):
        pki.sign_device_csr(ca, garbage, "dev-7", days=30)


def test_certificate_pem_is_not_a_csr(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(InvalidInput):
        pki.sign_device_csr(ca, pki.certificate_pem(ca.certificate), "dev-7", days=30)


def test_tampered_csr_is_refused(ca: pki.CertificateAuthority) -> None:
    """A CSR carrying key A but signed by key B proves nothing about A: refuse it."""
    carried = ec.generate_private_key(ec.SECP256R1())
    signer = ec.generate_private_key(ec.SECP256R1())
    # Build a valid CSR for `signer`, then splice `carried`'s public key into its DER at the same length.
    csr_der = _csr(signer).public_bytes(serialization.Encoding.DER)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    signer_spki = signer.public_key().public_bytes(serialization.Encoding.DER, spki)
    carried_spki = carried.public_key().public_bytes(serialization.Encoding.DER, spki)
    assert csr_der.count(signer_spki) == 1
    assert len(signer_spki) == len(carried_spki)
    tampered = x509.load_der_x509_csr(csr_der.replace(signer_spki, carried_spki))
    assert tampered.public_key() == carried.public_key()

    with pytest.raises(InvalidInput, match="signature does not verify"):
        pki.sign_device_csr(ca, _pem(tampered), "dev-7", days=30)


def test_rsa_1024_is_refused(ca: pki.CertificateAuthority) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the weak key under test
    with pytest.raises(InvalidInput, match="1024 bits refused"):
        pki.sign_device_csr(ca, _pem(_csr(key)), "dev-7", days=30)


def test_weak_curve_is_refused(ca: pki.CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(InvalidInput, match="secp256k1 refused"):
        pki.sign_device_csr(ca, _pem(_csr(key)), "dev-7", days=30)


@pytest.mark.parametrize("device_id", ["", "dev.1", "dev/1", "dev+", "#", "a" * 65, "dev-1\n"])
def test_bad_device_id_is_refused(ca: pki.CertificateAuthority, device_id: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidInput, match="device id"):
        pki.sign_device_csr(ca, _pem(_csr(key)), device_id, days=30)
    with pytest.raises(InvalidInput, match="device id"):
        pki.issue_device_credentials(ca, device_id, days=30)


def test_zero_days_is_refused(ca: pki.CertificateAuthority) -> None:
    with pytest.raises(InvalidInput, match="at least 1 day"):
        pki.issue_device_credentials(ca, "dev-7", days=0)


def test_generated_key_matches_its_certificate(ca: pki.CertificateAuthority) -> None:
    key_pem, cert = pki.issue_device_credentials(ca, "dev-9", days=30)

    assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert key.public_key() == cert.public_key()
    # And the key really signs for that certificate.
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    signature = key.sign(b"challenge", ec.ECDSA(hashes.SHA256()))
    public.verify(signature, b"challenge", ec.ECDSA(hashes.SHA256()))
    assert pki.common_name(cert) == "dev-9"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    _verify_signed_by(cert, ca)


def test_pem_and_fingerprint_helpers(ca: pki.CertificateAuthority) -> None:
    _, cert = pki.issue_device_credentials(ca, "dev-9", days=30)

    assert pki.common_name(cert) == "dev-9"
    assert pki.common_name(ca.certificate) == "Swarm Test CA"
    pem = pki.certificate_pem(cert)
    assert x509.load_pem_x509_certificate(pem) == cert
    fingerprint = pki.fingerprint_sha256(cert)
    assert fingerprint == cert.fingerprint(hashes.SHA256()).hex()
    assert len(fingerprint) == 64
    assert fingerprint == fingerprint.lower()


def test_load_ca_refuses_a_key_of_another_certificate(ca: pki.CertificateAuthority) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    other_pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ValueError, match="does not belong"):
        pki.load_ca(pki.certificate_pem(ca.certificate), other_pem)


def test_load_ca_refuses_a_leaf_certificate(ca: pki.CertificateAuthority) -> None:
    key_pem, leaf = pki.issue_device_credentials(ca, "dev-9", days=30)
    with pytest.raises(ValueError, match="CA:TRUE"):
        pki.load_ca(pki.certificate_pem(leaf), key_pem)


def test_load_ca_files(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    cert_file, key_file = tmp_path / "ca.crt", tmp_path / "ca.key"
    cert_file.write_bytes(pki.certificate_pem(ca.certificate))
    key_file.write_bytes(
        ca.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    loaded = pki.load_ca_files(cert_file, key_file)
    assert loaded.certificate == ca.certificate
    assert loaded.private_key.public_key() == ca.certificate.public_key()


def test_openssl_verifies_signed_and_generated_certificates(ca: pki.CertificateAuthority, tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(pki.certificate_pem(ca.certificate))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signed = pki.sign_device_csr(ca, _pem(_csr(key)), "dev-ossl-1", days=30)
    _, generated = pki.issue_device_credentials(ca, "dev-ossl-2", days=30)

    for name, cert in (("signed", signed), ("generated", generated)):
        cert_file = tmp_path / f"{name}.crt"
        cert_file.write_bytes(pki.certificate_pem(cert))
        result = subprocess.run(
            ["openssl", "verify", "-CAfile", str(ca_file), "-purpose", "sslclient", str(cert_file)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == f"{cert_file}: OK"

    # As a server certificate the same file must fail: clientAuth only.
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), "-purpose", "sslserver", str(tmp_path / "generated.crt")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0


def test_rsa_padding_is_pkcs1v15_for_rsa_ca() -> None:
    """An RSA CA signs with SHA-256 and PKCS#1 v1.5, which every TLS stack accepts."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RSA CA")])
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    rsa_ca = pki.CertificateAuthority(certificate=ca_cert, private_key=key)
    _, cert = pki.issue_device_credentials(rsa_ca, "dev-1", days=1)

    assert cert.signature_hash_algorithm is not None
    key.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm
    )
    # No SKI on this CA: the AKI is derived from its public key instead.
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest


def test_device_certificate_names_the_device_in_its_first_dns_san(ca: pki.CertificateAuthority) -> None:
    _, cert = pki.issue_device_credentials(ca, "dev-san", days=30)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["dev-san"]
