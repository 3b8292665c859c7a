import stat

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sdk.errors import SignatureError, SigningKeyError
from sdk.signing import generate_keys, key_id, load_private_key, load_public_key, sign, verify


def test_generate_writes_a_usable_pair_with_a_private_private_key(tmp_path) -> None:
    private, public = generate_keys(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    priv, pub = load_private_key(private), load_public_key(public)
    assert key_id(priv) == key_id(pub) and len(key_id(pub)) == 16
    sig = sign(priv, b"manifest")
    assert verify([pub], b"manifest", sig, key_id(pub)) == key_id(pub)


def test_generate_refuses_to_overwrite_without_force(tmp_path) -> None:
    generate_keys(tmp_path)
    old = (tmp_path / "public.pem").read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        generate_keys(tmp_path)
    generate_keys(tmp_path, overwrite=True)
    assert (tmp_path / "public.pem").read_bytes() != old


def test_wrong_key_files_are_named(tmp_path) -> None:
    private, public = generate_keys(tmp_path)
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        load_private_key(public)
    with pytest.raises(SigningKeyError, match="cannot read"):
        load_public_key(tmp_path / "missing.pem")
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "rsa.pem").write_bytes(rsa_pem)
    with pytest.raises(SigningKeyError, match="not an Ed25519 key"):
        load_private_key(tmp_path / "rsa.pem")


def test_verify_rejects_untrusted_signer_and_changed_data(tmp_path) -> None:
    a_priv, a_pub = generate_keys(tmp_path / "a")
    b_priv, b_pub = generate_keys(tmp_path / "b")
    priv_a, pub_a, pub_b = load_private_key(a_priv), load_public_key(a_pub), load_public_key(b_pub)
    sig = sign(priv_a, b"data")
    with pytest.raises(SignatureError, match="not among the trusted keys"):
        verify([pub_b], b"data", sig, key_id(pub_a))
    with pytest.raises(SignatureError, match="changed after signing"):
        verify([pub_a], b"data!", sig, key_id(pub_a))
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify([], b"data", sig, key_id(pub_a))
