"""Node tokens: what an agent proves it may serve a node with.

Strategy: a node token is a JWT signed with the proxy's token key (the
``identity.token`` section), kept apart from user tokens in two ways, so that
neither is accepted where the other is expected:

- its issuer is the configured issuer plus ``NODE_ISSUER_SUFFIX``: a user-token
  check (``TokenCodec.decode``, which always compares ``iss``) refuses it as
  ``token_bad_issuer``, and the node check refuses a user token the same way;
- its JWS header says ``typ: dbproxy-node+jwt`` (explicit typing, RFC 8725
  §3.11), which the node check requires.

``sub`` is the node's name, ``roles`` is empty.  Expiry, leeway and the
revocation file are the user tokens' (``dbproxy token revoke`` works on node
tokens too).  Nothing here logs a token.
"""

from __future__ import annotations

import secrets
import time

import jwt

from ..errors import AuthFailed
from ..identity.authority import TokenAuthority
from ..identity.tokens import TokenClaims, TokenCodec

NODE_ISSUER_SUFFIX = "#node"
NODE_TYP = "dbproxy-node+jwt"


class NodeTokens:
    """Issue and check node tokens with a ``TokenAuthority``'s key, clock and revocation list."""

    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority
        cfg = authority.cfg
        self.issuer = (cfg.issuer or "dbproxy") + NODE_ISSUER_SUFFIX
        self.codec = TokenCodec(authority.keys, issuer=self.issuer, leeway=cfg.leeway)

    def issue(self, node: str, ttl: int, *, now: float | None = None) -> tuple[str, TokenClaims]:
        keys = self.authority.keys
        iat = int(time.time() if now is None else now)
        claims = TokenClaims(sub=node, roles=(), iat=iat, exp=iat + int(ttl), jti=secrets.token_urlsafe(12),
                             iss=self.issuer)
        payload = dict(sorted(claims.to_json().items()))
        token = jwt.encode(payload, keys.signing_key, algorithm=keys.algorithm,
                           headers={"kid": keys.key_id, "typ": NODE_TYP})
        return token, claims

    def verify(self, token: str, node: str, *, now: float | None = None) -> TokenClaims:
        """The claims of a valid, unexpired, unrevoked node token for ``node``; else ``AuthFailed``."""
        claims = self.codec.decode(token)  # signature, key id, issuer
        try:
            typ = jwt.get_unverified_header(token).get("typ")
        except jwt.InvalidTokenError:
            typ = None
        if typ != NODE_TYP:
            raise AuthFailed("not a node token", reason="token_not_node", token_id=claims.jti)
        if claims.sub != node:
            raise AuthFailed(f"token {claims.jti} is for node {claims.sub!r}, not {node!r}", reason="token_wrong_node",
                             token_id=claims.jti)
        self.codec.check_time(claims, now)
        if self.authority.revoked(claims.jti):
            raise AuthFailed(f"token {claims.jti} of node {claims.sub!r} is revoked", reason="token_revoked",
                             token_id=claims.jti)
        return claims
