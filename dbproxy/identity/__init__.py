"""Who is connecting: signed tokens, SCRAM verifiers for tokens, mTLS identities.

Strategy.  A person proves who they are to the proxy with a **short-lived
signed token used as the password** of their stock client, or with a client
certificate (mTLS).  Engines never parse tokens or certificates themselves:
they call one ``ClientAuthenticator`` (one per listener, built by
``dbproxy.access``) and get a ``dbproxy.session.Identity`` or an
``AuthFailed`` whose ``reason`` goes to the audit trail (never the token).

One module per concern, lower ones first (none imports a higher one):

- ``config``        the ``identity`` config section and its validation
- ``keys``          a key and its pinned JWS algorithm (PyJWT), key generation, base64url
- ``tokens``        JWT claims, signing and verification, the clock checks
- ``files``         state files: re-read on change, atomic rewrite under a lock
- ``registry``      each token's SCRAM verifiers, signed, keyed by token id
- ``authority``     a token against user, clock and revocation; the SCRAM server over tokens
- ``mtls``          the identity in a verified client certificate
- ``authenticator`` what one listener accepts: the object engines call

This package exports what engines use (the authenticator's API and its
error); the core and the token CLI import the module of the concern.
"""

from ..errors import AuthFailed
from ..scram import SCRAM_SHA_256
from .authenticator import ClientAuthenticator
from .authority import ScramTokenServer

__all__ = ["SCRAM_SHA_256", "AuthFailed", "ClientAuthenticator", "ScramTokenServer"]
