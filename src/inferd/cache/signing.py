"""Model signing with OpenSSF model signing (`model-signing`), key-based and offline.

A signature covers every file of a cached model folder (the weights, tokenizer, licence and
inferd's `provenance.json`), hashed by the library into a signed manifest (a Sigstore bundle
signed with an elliptic-curve key). It is stored beside the folder, `<variant>.sig`, so signing
never changes what it signs. `inferd cache sign` makes it with the private key,
`inferd cache verify --signature` checks it with the public key, and `INFERD_REQUIRE_SIGNED=1`
makes `inferd serve` refuse a model whose signature is missing, made by another key, or does not
match the files (even when someone changed `provenance.json` to match altered weights: the cache's
own check trusts that record, the signature does not).

Keys are ordinary PEM files, e.g. `openssl ecparam -name prime256v1 -genkey -noout -out key.pem`
and `openssl ec -in key.pem -pubout -out key.pub`.
"""

from __future__ import annotations

import re
from pathlib import Path

from inferd.errors import ConfigError, IntegrityError


def signature_path(model_dir: Path) -> Path:
    return model_dir.parent / f"{model_dir.name}.sig"


def _readable(key: Path, what: str) -> None:
    if not key.is_file():
        raise ConfigError(f"{what} {key} does not exist")


def sign(model_dir: Path, private_key: Path, signature: Path | None = None) -> Path:
    from model_signing import signing  # heavy (sigstore); only where signing happens

    _readable(private_key, "private key")
    target = signature or signature_path(model_dir)
    try:
        config = signing.Config()  # type: ignore[no-untyped-call]
        config.use_elliptic_key_signer(private_key=private_key).sign(model_dir, target)
    except (ValueError, TypeError) as exc:  # not an EC key in PEM, or one that is encrypted
        raise ConfigError(f"cannot sign with {private_key}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot write the signature {target}: {exc.strerror or exc}") from None
    return target


def verify(model_dir: Path, public_key: Path, signature: Path | None = None) -> Path:
    """The signature checked; IntegrityError saying whether it is missing or does not match."""
    from model_signing import verifying

    _readable(public_key, "public key")
    source = signature or signature_path(model_dir)
    if not source.is_file():
        raise IntegrityError(
            f"{model_dir} is not signed (no {source}); sign it with `inferd cache sign`"
        )
    try:
        config = verifying.Config()  # type: ignore[no-untyped-call]
        config.use_elliptic_key_verifier(public_key=public_key).verify(model_dir, source)
    except Exception as exc:
        # Its messages say which file differs, or that the key does not match; a tampered
        # signature raises cryptography's InvalidSignature, with no message.
        reason = _reason(str(exc)) or type(exc).__name__
        raise IntegrityError(
            f"{model_dir}: signature {source} does not verify with {public_key}: {reason}"
        ) from None
    return source


def _reason(message: str) -> str:
    """The library's message, with raw digests left out: which files, and what about them."""
    changed = re.findall(r"Hash mismatch for '([^']+)'", message)
    if changed:
        return f"changed since signing: {', '.join(changed)}"
    return message.splitlines()[0] if message else ""
