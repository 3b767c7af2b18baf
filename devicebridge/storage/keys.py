"""Therapists' private signing keys on this computer (Ed25519, PEM): a 0700 folder of 0600
files, under the user config directory or ``DEVICEBRIDGE_KEY_DIR``. The key never leaves
this folder but to sign (``routine sign``, the clinic console)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import platformdirs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devicebridge.config import APP_NAME
from devicebridge.errors import TherapistKeyError
from devicebridge.storage.files import PRIVATE_FILE_MODE, make_private, private_directory

KEY_DIR_ENV: Final = "DEVICEBRIDGE_KEY_DIR"


def key_dir() -> Path:
    """Where therapist private keys live (a 0700 folder of 0600 files): env, else the user
    config dir."""
    from_env = os.environ.get(KEY_DIR_ENV)
    if from_env:
        return Path(from_env)
    return Path(platformdirs.user_config_dir(APP_NAME)) / "keys"


def private_key_dir() -> Path:
    """:func:`key_dir`, created 0700 (an existing one made 0700, its keys 0600)."""
    folder = key_dir()
    try:
        private_directory(folder)
        for existing in folder.glob("*.pem"):
            make_private(existing, PRIVATE_FILE_MODE)
    except OSError as exc:
        raise TherapistKeyError(
            f"cannot prepare the key folder: {exc.strerror}", path=folder
        ) from exc
    return folder


def key_path(therapist_id: str) -> Path:
    if not therapist_id or any(c in therapist_id for c in "/\\") or therapist_id.startswith("."):
        raise TherapistKeyError(f"{therapist_id!r} cannot name a key file", path=key_dir())
    return key_dir() / f"{therapist_id}.pem"


def load_private_key(therapist_id: str | None) -> tuple[str, Ed25519PrivateKey]:
    """The key of ``therapist_id``, or the only key in the key directory."""
    folder = private_key_dir()
    if therapist_id is None:
        keys = sorted(folder.glob("*.pem"))
        if len(keys) != 1:
            raise TherapistKeyError(
                f"{len(keys)} keys here; choose one with --therapist"
                if keys
                else "no therapist key (devicebridge therapist keygen)",
                path=folder,
            )
        therapist_id, path = keys[0].stem, keys[0]
    else:
        path = key_path(therapist_id)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise TherapistKeyError("no such key (devicebridge therapist keygen)", path=path) from None
    except (OSError, ValueError) as exc:
        raise TherapistKeyError(f"unreadable private key: {exc}", path=path) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise TherapistKeyError("not an Ed25519 private key", path=path)
    return therapist_id, key
