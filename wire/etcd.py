"""A thin client for a session's etcd cluster (``[cluster] etcd = [...]``).

    etcd = Etcd.for_cluster(session.cluster, tls_dir)    # or Etcd(urls, tls_dir)
    lease = etcd.grant(5)
    rev = etcd.create(etcd.key("demo", "leader"), b'{"host": "c1"}', lease)
    # rev is the key's create revision (the leader's epoch); None: it exists
    etcd.keepalive(lease)        # remaining TTL, 0: the lease is gone

What it is: etcd3gw (``etcd3gw.Etcd3Client``) does every HTTP request to
etcd's v3 JSON gateway; this module only

- rotates over the cluster's endpoints: a call goes to the endpoint that
  answered last, and on a connection failure, a timeout or a 5xx (a member
  without a leader answers 503) to the next, until one answers or every one
  was tried once; a refusal (4xx: a lease not found, a bad request) is
  final, as every member would say the same;
- bounds every request by ``timeout`` (requests' connect timeout covers the
  TCP and TLS handshakes, its read timeout the answer, which etcd sends in
  one piece): a killed member costs nothing (refused), a stopped or
  partitioned one, or one without quorum (its linearizable reads wait for
  a leader), costs ``timeout``; host names are resolved outside that bound,
  so sessions name members by address;
- turns whatever goes wrong into ``EtcdError``, one line naming every
  endpoint tried and what each said;
- decodes keys and values (base64 on the wire) into ``KV``.

Keys are text (utf-8), values bytes; by convention values are JSON text.
etcd3gw's own helpers encode ``str`` as latin-1, so this module always hands
it bytes.

TLS: the session's PKI, as every TCP path of cgmirror (docs/TLS.md).
``tls_dir`` is a host's certificate directory (``ca-cert.pem``,
``client-cert.pem``, ``client-key.pem``); the SSL context comes from
``wire.tls`` (TLS 1.3, the session CA the only trust anchor, the member's
certificate checked against the host of the URL dialled) and is mounted in
each endpoint's requests session, so no system CA store is ever consulted.

Retries and lost replies: a write whose reply is lost (timeout) may have been
applied before the next endpoint is tried.  ``put`` and ``delete`` are
idempotent in effect.  ``create``, ``put_if`` and ``put_if_value`` bind to a
lease in every use that matters (leader key, primary leases): when such a
call was retried and its compare failed, the key is read back, and a key
holding this call's value under this call's (non-zero) lease is this call's
own write, so the call reports success rather than losing its own election.

Why etcd3gw: the OpenStack-maintained client of etcd's JSON gateway, pure
Python over requests (no grpc wheels to build), packaged by Debian
(python3-etcd3gw) and on PyPI; ``tooz`` sits on top of it and adds a
coordination layer (groups, locks by its own key scheme) that cgmirror does
not use.  python-etcd3 (grpc) is no longer maintained.

Rejected: a hand-written HTTP client (a home-made protocol is what the issue
rules out), and watches (a long-poll stream per watcher, reconnect logic): the callers
poll at ttl/10, which is cheap on etcd and bounded in time.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import threading
import urllib.parse
from typing import NamedTuple

from wire import tls

# requests and etcd3gw (~150 ms to import) are loaded by the first Etcd, not
# by importing this module: the session parser uses parse_endpoint, and every
# cgmirror command loads the session.
requests = gw_exceptions = Etcd3Client = _SessionTLS = None

# etcd 3.4's gateway; said explicitly so that no /version round trip is made
# to discover it (etcd3gw's default).
API_PATH = "/v3/"
DEFAULT_TIMEOUT_S = 2.0
MAX_ENDPOINTS = 7


class EtcdError(Exception):
    """etcd could not be reached or refused a request (one line: the
    endpoints tried and what each said).  ``endpoints_tried`` lists them."""

    def __init__(self, message: str, endpoints_tried: tuple[str, ...] = ()):
        super().__init__(" ".join(str(message).split()))
        self.endpoints_tried = endpoints_tried


class KV(NamedTuple):
    """One key as etcd holds it."""

    key: str
    value: bytes
    create_rev: int
    mod_rev: int
    lease: int


def parse_endpoint(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``http(s)://HOST:PORT``; ValueError (one line) if not."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not an etcd URL like https://10.0.0.1:2379: {exc}") \
            from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or port is None \
            or parts.path not in ("", "/") or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise ValueError(f"{url!r} is not an etcd URL like https://10.0.0.1:2379"
                         f" (scheme, host and port, nothing else)")
    return parts.scheme, parts.hostname, port


def _load() -> None:
    """Import requests and etcd3gw, and define the TLS adapter, once."""
    global requests, gw_exceptions, Etcd3Client, _SessionTLS
    if _SessionTLS is not None:
        return
    import requests as _requests
    from requests.adapters import HTTPAdapter
    from etcd3gw import exceptions as _gw_exceptions
    from etcd3gw.client import Etcd3Client as _Etcd3Client

    class SessionTLS(HTTPAdapter):
        """A requests adapter whose connections use one ``ssl.SSLContext``
        (wire.tls's), instead of requests' own defaults."""

        def __init__(self, context):
            self._context = context
            super().__init__(max_retries=0)

        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = self._context
            return super().init_poolmanager(*args, **kwargs)

    requests, gw_exceptions, Etcd3Client = _requests, _gw_exceptions, _Etcd3Client
    _SessionTLS = SessionTLS


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(value, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"etcd {what} must be bytes or str, not {type(value).__name__}")


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with ``prefix`` (etcd's
    range_end for a prefix: the prefix with its last byte below 0xff
    incremented; all 0xff: to the end of the keyspace)."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


def _kv(item: dict) -> KV:
    return KV(key=base64.b64decode(item.get("key", "")).decode("utf-8", "replace"),
              value=base64.b64decode(item.get("value", "")),
              create_rev=int(item.get("create_revision", 0)),
              mod_rev=int(item.get("mod_revision", 0)),
              lease=int(item.get("lease", 0)))


class _Refused(Exception):
    """etcd answered, and refused (4xx): another endpoint would say the same."""


class Etcd:
    """A session's etcd cluster (see the module docstring).  Safe to share
    between threads: each thread gets its own HTTP sessions."""

    def __init__(self, endpoints, tls_dir: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT_S, prefix: str = "/cgmirror"):
        if isinstance(endpoints, str):
            endpoints = [e for e in endpoints.split(",") if e]
        self.endpoints = tuple(endpoints)
        if not 1 <= len(self.endpoints) <= MAX_ENDPOINTS:
            raise ValueError(f"etcd: 1 to {MAX_ENDPOINTS} endpoints, not"
                             f" {len(self.endpoints)}")
        self._parsed = [parse_endpoint(e) for e in self.endpoints]
        if any(s == "https" for s, _, _ in self._parsed) and tls_dir is None:
            raise ValueError("etcd: https endpoints need a certificate directory (tls_dir)")
        if not timeout > 0:
            raise ValueError(f"etcd: timeout must be above 0 seconds, not {timeout!r}")
        _load()
        self.tls_dir = tls_dir
        self.timeout = float(timeout)
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        # Loaded once here, so that a bad directory fails at construction, in
        # one line (wire.tls.TLSConfigError), not at the first request.
        self._context = (tls.HostFiles(tls_dir).client_context()
                         if tls_dir is not None else None)
        if self._context is not None:
            # urllib3 1.26 wraps a socket to an IP address without
            # server_hostname, which a context with check_hostname refuses;
            # it then matches the certificate against the host it dialled
            # itself (IP SANs included) whenever the context does not.  So
            # the name is still checked, by urllib3 instead of ssl.
            self._context.check_hostname = False
        self._local = threading.local()
        self._lock = threading.Lock()
        self._current = 0           # the endpoint that answered last
        self._sessions: list = []   # every thread's, for close()
        self._generation = 0        # bumped by close(): threads make new clients

    @classmethod
    def for_cluster(cls, cluster, tls_dir: str | None,
                    timeout: float = DEFAULT_TIMEOUT_S) -> "Etcd":
        """The client for a session's ``[cluster]`` (a ClusterConfig)."""
        return cls(cluster.etcd, tls_dir, timeout=timeout, prefix=cluster.prefix)

    def __repr__(self) -> str:
        return f"Etcd({', '.join(self.endpoints)})"

    def close(self) -> None:
        """Close every HTTP connection (of every thread); the next call
        opens new ones."""
        with self._lock:
            sessions, self._sessions = self._sessions, []
            self._generation += 1
        for session in sessions:
            session.close()

    def __enter__(self) -> "Etcd":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- keys --------------------------------------------------------------

    def key(self, session: str, *parts: str) -> str:
        """``{prefix}/{session}/{part/part...}``: where a session keeps ``parts``."""
        return f"{self.prefix}/{session}/{'/'.join(parts)}"

    # -- leases ------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` whole seconds; its id."""
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"etcd lease TTL must be whole seconds >= 1, not {ttl!r}")
        r = self._call("grant a lease", "/lease/grant", {"TTL": ttl, "ID": 0})
        if r.get("error"):
            raise EtcdError(f"etcd refused a lease of {ttl} s: {r['error']}")
        return int(r["ID"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its remaining TTL in seconds, 0 if it is gone."""
        r = self._call("renew a lease", "/lease/keepalive", {"ID": lease})
        if not isinstance(r.get("result"), dict):
            raise EtcdError(f"etcd: cannot renew lease {lease}: an answer without a"
                            f" result ({_line(r)})")
        # No TTL (or -1): etcd no longer knows the lease (expired or revoked).
        return max(int(r["result"].get("TTL", 0)), 0)

    def revoke(self, lease: int) -> None:
        """Revoke ``lease`` (its keys go with it); a lease already gone is fine."""
        try:
            self._call("revoke a lease", "/kv/lease/revoke", {"ID": lease})
        except _Refused as exc:
            if "not found" not in str(exc):
                raise EtcdError(str(exc)) from None

    def ttl(self, lease: int) -> int:
        """The remaining TTL of ``lease`` without renewing it; 0 if gone."""
        r = self._call("read a lease", "/kv/lease/timetolive", {"ID": lease})
        return max(int(r.get("TTL", -1)), 0)

    def status(self) -> dict:
        """The answering member's status (etcd's maintenance/status):
        ``member_id``, ``leader`` (the leader's member id, 0: none known),
        ``raftTerm``, ``version``, ... (ids and counters as ints)."""
        r = self._call("read a member's status", "/maintenance/status", {})
        out = {k: v for k, v in r.items() if k != "header"}
        out["member_id"] = int(r["header"]["member_id"])
        for k in ("leader", "raftIndex", "raftTerm", "raftAppliedIndex", "dbSize"):
            if k in out:
                out[k] = int(out[k])
        return out

    # -- reads -------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        """The key, or None if absent."""
        r = self._call(f"read {key}", "/kv/range", {"key": _b64(_bytes(key, "key"))})
        kvs = r.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> list[KV]:
        """Every key starting with ``prefix``, in key order."""
        p = _bytes(prefix, "key")
        r = self._call(f"read {prefix}*", "/kv/range",
                       {"key": _b64(p), "range_end": _b64(_prefix_end(p)),
                        "sort_order": 1, "sort_target": 0})
        return [_kv(i) for i in r.get("kvs") or []]

    def revision(self) -> int:
        """The cluster's current revision."""
        r = self._call("read the revision", "/kv/range", {"key": _b64(b"\0"),
                                                          "count_only": True})
        return int(r["header"]["revision"])

    # -- writes ------------------------------------------------------------

    def put(self, key: str, value, lease: int = 0) -> int:
        """Write ``key``; the revision of the write."""
        body = {"key": _b64(_bytes(key, "key")), "value": _b64(_bytes(value, "value"))}
        if lease:
            body["lease"] = lease
        r = self._call(f"write {key}", "/kv/put", body)
        return int(r["header"]["revision"])

    def delete(self, key: str) -> None:
        """Remove ``key`` (absent is fine)."""
        self._call(f"delete {key}", "/kv/deleterange", {"key": _b64(_bytes(key, "key"))})

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key starting with ``prefix``; how many there were."""
        p = _bytes(prefix, "key")
        r = self._call(f"delete {prefix}*", "/kv/deleterange",
                       {"key": _b64(p), "range_end": _b64(_prefix_end(p))})
        return int(r.get("deleted", 0))

    def create(self, key: str, value, lease: int = 0) -> int | None:
        """Write ``key`` only if absent; its create revision, or None if it
        exists (and is not this call's own write, see the module docstring)."""
        k, v = _bytes(key, "key"), _bytes(value, "value")
        ok, rev, retried = self._txn(f"create {key}",
                                     [{"key": _b64(k), "result": "EQUAL",
                                       "target": "CREATE", "create_revision": 0}],
                                     k, v, lease)
        if ok:
            return rev
        if retried and lease:
            mine = self._own_write(key, v, lease)
            if mine is not None:
                return mine.create_rev
        return None

    def put_if(self, key: str, value, mod_rev: int, lease: int = 0) -> bool:
        """Write ``key`` only if its mod revision is ``mod_rev`` (0: only if
        absent): compare-and-swap.  False if it changed meanwhile."""
        k, v = _bytes(key, "key"), _bytes(value, "value")
        if mod_rev:
            cmp = {"key": _b64(k), "result": "EQUAL", "target": "MOD",
                   "mod_revision": mod_rev}
        else:
            cmp = {"key": _b64(k), "result": "EQUAL", "target": "CREATE",
                   "create_revision": 0}
        ok, _, retried = self._txn(f"write {key} if at revision {mod_rev}", [cmp],
                                   k, v, lease)
        if not ok and retried and lease:
            return self._own_write(key, v, lease) is not None
        return ok

    def put_if_value(self, key: str, value, guard_key: str, guard_value: bytes,
                     lease: int = 0) -> bool:
        """Write ``key`` only if ``guard_key`` holds exactly ``guard_value``
        (absent never matches).  False if it does not."""
        k, v = _bytes(key, "key"), _bytes(value, "value")
        g = _bytes(guard_key, "key")
        # An absent key has no value, so a VALUE compare on it fails: "absent"
        # never matches a guard, whatever guard_value is.
        cmp = [{"key": _b64(g), "result": "EQUAL", "target": "VALUE",
                "value": _b64(_bytes(guard_value, "guard value"))}]
        ok, _, retried = self._txn(f"write {key} if {guard_key} holds {guard_value!r}",
                                   cmp, k, v, lease)
        if not ok and retried and lease:
            return self._own_write(key, v, lease) is not None
        return ok

    def _txn(self, what: str, compare: list, key: bytes, value: bytes,
             lease: int) -> tuple[bool, int, bool]:
        """(succeeded, revision, retried) of compare -> put."""
        put = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = lease
        attempts: list[int] = []
        r = self._call(what, "/kv/txn", {"compare": compare,
                                         "success": [{"request_put": put}],
                                         "failure": []}, attempts=attempts)
        return bool(r.get("succeeded", False)), int(r["header"]["revision"]), \
            len(attempts) > 1

    def _own_write(self, key: str, value: bytes, lease: int) -> KV | None:
        kv = self.get(key)
        if kv is not None and kv.lease == lease and kv.value == value:
            return kv
        return None

    # -- the one boundary to etcd3gw -----------------------------------------

    def _client(self, i: int):
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            local.clients, local.generation = {}, self._generation
        c = local.clients.get(i)
        if c is None:
            scheme, host, port = self._parsed[i]
            session = requests.Session()
            session.trust_env = False       # no proxies, no netrc, no REQUESTS_CA_BUNDLE
            if scheme == "https":
                session.mount("https://", _SessionTLS(self._context))
                # requests hands `verify` to urllib3 as the CA file to load:
                # the session CA again (never certifi's bundle).
                session.verify = tls.HostFiles(self.tls_dir).ca
            with self._lock:
                self._sessions.append(session)
            c = local.clients[i] = Etcd3Client(host=host, port=port, protocol=scheme,
                                               timeout=self.timeout, api_path=API_PATH,
                                               session=session)
        return c

    def _call(self, what: str, path: str, body: dict, attempts: list | None = None) -> dict:
        """POST ``body`` to ``path`` at the endpoints in turn, starting with
        the one that answered last; the JSON answer of the first that does.
        ``attempts`` (if given) collects the index of every endpoint tried."""
        with self._lock:
            start = self._current
        n = len(self.endpoints)
        said: list[str] = []
        for k in range(n):
            i = (start + k) % n
            if attempts is not None:
                attempts.append(i)
            client = self._client(i)
            try:
                r = client.post(client.get_url(path), json=body)
            except gw_exceptions.Etcd3Exception as exc:
                text = _reason(exc, self.timeout)
                if type(exc) is gw_exceptions.Etcd3Exception and _is_4xx(exc):
                    raise _refused(what, self.endpoints[i], text) from None
                said.append(f"{self.endpoints[i]}: {text}")
                continue
            except (requests.RequestException, ValueError, OSError) as exc:
                said.append(f"{self.endpoints[i]}: {_transport(_innermost(exc), self.timeout)}")
                continue
            if not isinstance(r, dict):
                said.append(f"{self.endpoints[i]}: not a JSON object")
                continue
            err = r.get("error")
            if isinstance(err, dict):
                # A streaming call (lease keepalive) reports its error in the
                # body of a 200: {"error": {"http_code", "message", ...}}.
                text = _line(err.get("message") or err)
                if 400 <= int(err.get("http_code") or 500) < 500:
                    raise _refused(what, self.endpoints[i], text)
                said.append(f"{self.endpoints[i]}: {text}")
                continue
            with self._lock:
                self._current = i
            return r
        with self._lock:
            # Next time, start past the first one that failed.
            self._current = (start + 1) % n
        raise EtcdError(f"etcd: cannot {what}: no endpoint answered"
                        f" ({'; '.join(said)})", tuple(self.endpoints))


def _refused(what: str, endpoint: str, text: str) -> "EtcdError":
    return _RefusedError(f"etcd at {endpoint} refused to {what}: {text}", (endpoint,))


class _RefusedError(EtcdError, _Refused):
    """etcd answered and refused (a 4xx): an EtcdError, not worth retrying."""


def _is_4xx(exc) -> bool:
    # etcd3gw raises a bare Etcd3Exception(resp.text, resp.reason) for every
    # status it does not map (500/503/408/504/412 have classes of their own).
    # The reason phrase of a 4xx is one of requests' 4xx reasons; anything
    # else (a 5xx etcd3gw does not map) is worth another endpoint.
    reason = exc.args[0] if exc.args else ""
    return reason in _4XX_REASONS


_4XX_REASONS = {"Bad Request", "Unauthorized", "Forbidden", "Not Found",
                "Method Not Allowed", "Conflict", "Gone", "Too Many Requests"}


def _reason(exc, timeout: float) -> str:
    """Why one endpoint did not answer, on one line: etcd's own message when
    it answered with an error, else what happened to the connection."""
    inner = _innermost(exc)
    if inner is not exc:
        return _transport(inner, timeout)
    detail = getattr(exc, "detail_text", None) or ""
    msg = ""
    if detail:
        try:
            doc = json.loads(detail)
            msg = doc.get("message") or doc.get("error") or ""
        except (ValueError, AttributeError):
            msg = detail
    if not msg:
        msg = " ".join(str(a) for a in exc.args) or type(exc).__name__
    return _line(msg)


def _innermost(exc: BaseException) -> BaseException:
    """The socket- or ssl-level cause under etcd3gw's, requests' and urllib3's
    wrappers (etcd3gw re-raises inside ``except``, urllib3 keeps ``reason``)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = getattr(exc, "reason", None)
        if not isinstance(nxt, BaseException):
            nxt = next((a for a in exc.args if isinstance(a, BaseException)), None)
        if nxt is None and isinstance(exc, gw_exceptions.Etcd3Exception):
            # Only etcd3gw's own wrapper: deeper down, __context__ is whatever
            # urllib3 happened to catch on the way (its Python 2 fallbacks).
            nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _transport(exc: BaseException, timeout: float) -> str:
    """One line for a connection that failed (refused, timed out, TLS)."""
    name = type(exc).__name__
    # etcd (Go, TLS 1.3) refuses a client certificate after the client's
    # side of the handshake is done: the client sees the alert, or only the
    # connection closing, depending on timing.  One message for both.
    if isinstance(exc, ssl.SSLEOFError) or getattr(exc, "reason", None) in (
            "SSLV3_ALERT_BAD_CERTIFICATE", "TLSV1_ALERT_UNKNOWN_CA"):
        return ("it refused this client's certificate in the TLS handshake"
                " (is it from this session's CA?)")
    if isinstance(exc, (ssl.SSLError, ssl.SSLCertVerificationError)):
        return tls.describe(exc, "").removeprefix("peer : ")
    if name == "CertificateError":      # urllib3's own host name check
        return f"{_MISNAMED}: {_line(exc)}"
    if isinstance(exc, ConnectionRefusedError) or "Connection refused" in str(exc):
        return "connection refused"
    if isinstance(exc, (TimeoutError, socket.timeout)) or "timed out" in str(exc) \
            or "Timeout" in name:
        return f"no answer within {timeout:g} s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return _line(exc)


_MISNAMED = "its certificate does not name the address dialled"


def _line(exc) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."
