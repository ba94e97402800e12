"""Tokens: JWTs (RFC 7519, compact JWS RFC 7515) signed and verified with one ``TokenKeys``.

Strategy: PyJWT encodes and verifies, with the key's algorithm pinned
(``algorithms=[alg]``: no ``none``, no algorithm confusion) and the header's
``kid`` required to name this key.  Claims: ``sub`` (user), ``roles``,
``iat``, ``exp``, ``jti`` (token id), ``iss`` (and ``nbf`` if present).  The
time checks are ours (``check_time``: a caller-given clock and leeway), so
tests and the proxy use one clock.  Users, files and revocation are
``authority.py``'s; this module knows one key and bytes.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Iterable

import attrs
import jwt
import orjson

from ..errors import AuthFailed
from .config import DEFAULT_LEEWAY
from .keys import TokenKeys, b64url_decode

MAX_TOKEN_BYTES = 4096


_TTL = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_TTL_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_ttl(text: str) -> int:
    """``"90"`` / ``"90s"`` / ``"30m"`` / ``"8h"`` / ``"1d"`` → seconds."""
    m = _TTL.match(text)
    if not m or int(m.group(1)) <= 0:
        raise ValueError(f"a duration like 30m, 8h or 1d, got {text!r}")
    return int(m.group(1)) * _TTL_UNITS[m.group(2)]


@attrs.frozen
class TokenClaims:
    sub: str
    roles: tuple[str, ...]
    iat: int
    exp: int
    jti: str
    iss: str | None = None
    nbf: int | None = None

    def to_json(self) -> dict:
        out = {"iss": self.iss, "sub": self.sub, "roles": list(self.roles), "iat": self.iat, "exp": self.exp, "jti": self.jti}
        if self.iss is None:
            del out["iss"]
        if self.nbf is not None:
            out["nbf"] = self.nbf
        return out


def looks_like_token(text: str) -> bool:
    return text.count(".") == 2 and len(text) > 20


class TokenCodec:
    """Sign and verify JWTs with one key (PyJWT, the key's algorithm pinned); knows nothing of users or files."""

    #: PyJWT checks signature, algorithm, the claims' presence and the types of sub/jti;
    #: the clock (exp/nbf/iat) is ``check_time``'s, with the caller's ``now``.
    _OPTIONS = {
        "verify_signature": True,
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_iss": False,
        "verify_aud": False,
        "require": ["sub", "iat", "exp", "jti"],
        "enforce_minimum_key_length": True,
    }

    def __init__(self, keys: TokenKeys, *, issuer: str | None = "dbproxy", leeway: int = DEFAULT_LEEWAY) -> None:
        self.keys = keys
        self.issuer = issuer
        self.leeway = leeway

    def issue(self, user: str, roles: Iterable[str], ttl: int, *, now: float | None = None, jti: str | None = None) -> tuple[str, TokenClaims]:
        iat = int(time.time() if now is None else now)
        claims = TokenClaims(
            sub=user, roles=tuple(roles), iat=iat, exp=iat + int(ttl),
            jti=jti or secrets.token_urlsafe(12), iss=self.issuer,
        )
        payload = dict(sorted(claims.to_json().items()))  # the same bytes as ever: sorted, compact
        token = jwt.encode(payload, self.keys.signing_key, algorithm=self.keys.algorithm, headers={"kid": self.keys.key_id})
        return token, claims

    def decode(self, token: str | bytes) -> TokenClaims:
        """Check shape, algorithm, key id and signature; return the claims (not yet time/user/revocation)."""
        if isinstance(token, bytes):
            try:
                token = token.decode("ascii")
            except UnicodeDecodeError:
                raise AuthFailed("password is not a token (not ASCII)", reason="token_malformed") from None
        if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2:
            raise AuthFailed("password is not a token", reason="token_malformed")
        try:
            decoded = jwt.decode_complete(token, self.keys.verifying_key, algorithms=[self.keys.algorithm], options=self._OPTIONS)
        except jwt.InvalidAlgorithmError:
            # RFC 8725 §3.1: accept only the algorithm the key is for.
            raise AuthFailed(f"token algorithm {_header_alg(token)!r} is not {self.keys.algorithm}", reason="token_bad_signature") from None
        except jwt.InvalidSignatureError:
            raise AuthFailed("token signature does not verify", reason="token_bad_signature") from None
        except jwt.DecodeError:
            if _json_segments(token):  # header and claims read fine: the signature is what is broken
                raise AuthFailed("token signature is not valid base64url", reason="token_bad_signature") from None
            raise AuthFailed("token is not base64url JSON", reason="token_malformed") from None
        except jwt.InvalidTokenError as exc:  # a missing claim, sub/jti not strings
            raise AuthFailed(f"token lacks sub/iat/exp/jti ({exc})", reason="token_malformed") from None
        except jwt.PyJWTError as exc:  # anything else PyJWT refuses is still a refused token, never a crash
            raise AuthFailed(f"token refused: {type(exc).__name__}", reason="token_malformed") from None
        if decoded["header"].get("kid") != self.keys.key_id:
            # Signed with this key, but the header names another: not a token this proxy issued.
            raise AuthFailed("token key id is not this proxy's key", reason="token_bad_signature")
        body = decoded["payload"]
        try:
            nbf = body.get("nbf")
            claims = TokenClaims(
                sub=_str(body["sub"]), roles=tuple(_str(r) for r in body.get("roles", [])),
                iat=_int(body["iat"]), exp=_int(body["exp"]), jti=_str(body["jti"]), iss=body.get("iss"),
                nbf=None if nbf is None else _int(nbf),
            )
        except (KeyError, TypeError, ValueError):
            raise AuthFailed("token lacks sub/iat/exp/jti", reason="token_malformed") from None
        if self.issuer is not None and claims.iss != self.issuer:
            raise AuthFailed(f"token issuer is not {self.issuer!r}", reason="token_bad_issuer", token_id=claims.jti)
        return claims

    def check_time(self, claims: TokenClaims, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if now >= claims.exp + self.leeway:
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} expired", reason="token_expired", token_id=claims.jti)
        if claims.iat > now + self.leeway or (claims.nbf is not None and claims.nbf > now + self.leeway):
            raise AuthFailed(f"token {claims.jti} of {claims.sub!r} is issued in the future", reason="token_not_yet_valid", token_id=claims.jti)


def _json_segments(token: str) -> bool:
    """Whether a token's header and claims are base64url JSON objects (which of its parts is broken)."""
    try:
        return all(isinstance(orjson.loads(b64url_decode(part)), dict) for part in token.split(".")[:2])
    except (ValueError, orjson.JSONDecodeError):
        return False


def _header_alg(token: str) -> str:
    try:
        return str(jwt.get_unverified_header(token).get("alg"))[:16]
    except jwt.InvalidTokenError:
        return "?"


def _str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError("not a string")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError("not an integer")
    return value
