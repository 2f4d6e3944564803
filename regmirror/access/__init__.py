"""
Who may pull: anonymous clients by address, users from an htpasswd file
(Basic auth), and bearer tokens the mirror issues itself at ``/token``
after a Basic login (the registry token flow, so that ``docker login``
then ``docker pull`` work).

A token names the namespace of every repository it is good for, as the
router decided it when the token was asked for; a request is let through
with a token only for the namespace and repository the router decides for
that request.  The challenge a refused request gets names the namespace
the way the router reads it back at ``/token``: the realm is on the
request's own ``Host``, carries ``?ns=`` when the request was routed by
``ns``, and the scope names the repository as the request wrote it.

Client credentials are checked here and go no further: nothing a client
sends is ever forwarded upstream, and no password reaches a log line.

Who the client is, behind a trusted proxy, comes from the one forwarding
header that proxy sets (``[access] forwarded_header``); a hop there that
is not an address is a client without one, which no network rule
matches.  Failed logins are counted per client in a table of fixed size,
shared by every process using the cache folder.

The parts: ``gate`` decides (:class:`~regmirror.access.gate.Gate`);
``clients`` says who a request comes from, behind trusted proxies, and
what its ``Host`` may be; ``htpasswd`` reads the users; ``tokens`` issues
and verifies the bearer tokens; ``logins`` counts failed logins.
"""

__all__ = ["clients", "gate", "htpasswd", "logins", "tokens"]
