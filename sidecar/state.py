"""Typed per-request state shared by the middlewares, the proxy and the request log.

Each key is written by one stage and read by later ones; the owning stage is named below.
"""

from aiohttp import web

from sidecar.decision import Decision
from sidecar.identity.base import Identity
from sidecar.mfa.session import SessionView
from sidecar.net.client_ip import IpAddress
from sidecar.net.forwarding import Forwarding

#: The client address the pipeline acts on (written by the client-IP middleware; until it
#: runs, the TCP peer). ``None`` when it could not be determined.
CLIENT_IP = web.RequestKey[IpAddress | None]("sidecar.client_ip")

#: What the console is told about the request (X-Forwarded-For/-Proto/-Host), by the proxy
#: and by identity introspection alike (written by the client-IP middleware, with CLIENT_IP).
FORWARDING = web.RequestKey("sidecar.forwarding", Forwarding)

#: How the request was answered (written by whichever stage answered it).
DECISION = web.RequestKey("sidecar.decision", Decision)

#: The upstream's status code, when the request reached the upstream (written by the proxy).
UPSTREAM_STATUS = web.RequestKey("sidecar.upstream_status", int)

#: Why a request was refused, for the log line (e.g. the matching rule, a parse failure).
REASON = web.RequestKey("sidecar.reason", str)

#: Whether the TCP peer is in network.trusted_proxies (written by the client-IP middleware).
PEER_TRUSTED = web.RequestKey("sidecar.peer_trusted", bool)

#: Who the console says is calling (written by the identity middleware; None = anonymous).
#: Absent when the identity stage did not run (exempt paths).
IDENTITY = web.RequestKey[Identity | None]("sidecar.identity")

#: The sidecar session as the MFA gate judged it (written by the MFA gate when it judged the
#: request; absent when the gate let it pass unjudged: anonymous, exempt, API token). A relayed
#: WebSocket keeps it, to be judged again while it is open.
MFA_SESSION = web.RequestKey("sidecar.mfa_session", SessionView)

#: The path to write on the log line when the real one carries something that must not be
#: logged (written by the handler that knows; e.g. a credential id).
LOG_PATH = web.RequestKey("sidecar.log_path", str)
