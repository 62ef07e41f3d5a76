"""The admin key: set by the operator, or generated at first start and printed once; kept hashed."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path


def _digest(key: str) -> str:
    # Keys are 256-bit random strings, so a plain SHA-256 is enough (no password stretching).
    return hashlib.sha256(key.encode()).hexdigest()


class AdminKeyStore:
    """One admin key's SHA-256 in `<data>/admin_key.sha256` (mode 0600)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "admin_key.sha256"
        self._digest: str | None = None

    def ensure(self, configured: str | None) -> str | None:
        """Use the operator's key, or keep the stored one, or make one.

        :returns: a newly generated key (to print once), else None.
        """
        generated = None
        if configured:
            self._write(_digest(configured))
        elif not self.path.is_file():
            generated = "lpx-admin-" + secrets.token_urlsafe(32)
            self._write(_digest(generated))
        self._digest = self.path.read_text().strip()
        return generated

    def matches(self, key: str) -> bool:
        """Constant-time comparison of the key's hash with the stored one."""
        return self._digest is not None and hmac.compare_digest(
            _digest(key), self._digest
        )

    def _write(self, digest: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_suffix(".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(digest)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.path)
