"""Where a coordinator's credentials are (a plan and ``nodes.yaml`` carry it): a plain
record that the worker can import without the coordinator's extras."""

from __future__ import annotations

from dataclasses import dataclass

SECURITY_FIELDS = ("ca", "cert", "key", "token_file")
"""The fields of a ``security:`` block."""


@dataclass(frozen=True)
class SecuritySpec:
    """Where the coordinator's credentials are: absolute paths, never the secrets themselves.

    ``ca``, ``cert`` and ``key`` (PEM) turn on mutual TLS; ``token_file`` holds the cluster
    token. The loader requires the three TLS files together, and at least TLS or a token.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token_file: str | None = None

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def to_dict(self) -> dict[str, str]:
        return {k: v for k, v in vars(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, str]) -> SecuritySpec:
        return cls(**{k: data.get(k) for k in SECURITY_FIELDS})
