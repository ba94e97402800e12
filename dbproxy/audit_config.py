"""Validation of the config's ``audit`` section: the sinks (jsonl, syslog, relp, http) and
their spools, each problem named by file, JSON path and expectation (see
``dbproxy.validate``, whose ``Validator`` these functions take as ``v``).  Building the
sinks from the result is ``audit.sinks.build_sink``'s job.
"""

from __future__ import annotations

import os
from typing import Any

from .configtypes import SecretRef, SinkConfig
from .validate import join

SINK_TYPES = ("jsonl", "syslog", "relp", "http")
# Keys allowed directly under "audit" in a config file.
AUDIT_KEYS = {"sinks", "queue_size", "worker", "durability"}

COMMON_KEYS = {"type", "name"}
JSONL_KEYS = {"path", "fsync", "fsync_interval_seconds", "rotate_bytes", "rotate_seconds", "gzip"}
SPOOL_KEYS = {
    "spool_dir",
    "spool_max_bytes",
    "on_spool_full",
    "batch_max_events",
    "batch_max_bytes",
    "retry_initial_seconds",
    "retry_max_seconds",
    "shutdown_flush_seconds",
    "batch_linger_seconds",
}
TLS_KEYS = {"ca_file", "server_name", "cert_file", "key_file"}
SYSLOG_KEYS = {
    "address", "transport", "facility", "app_name", "hostname", "format", "sd_id", "utf8_bom",
    "confirm_timeout_seconds", "connect_timeout_seconds", "confirm",
} | TLS_KEYS
# No TLS yet: the client side exists (RelpSink(ssl_context=...)) but has not been checked
# against imrelp's TLS (librelp/GnuTLS), so the config does not offer it.
RELP_KEYS = {
    "address", "facility", "app_name", "hostname", "format", "sd_id", "utf8_bom",
    "window", "ack_timeout_seconds", "connect_timeout_seconds",
}
HTTP_KEYS = {
    "url", "format", "token_file", "token_env", "gzip", "headers", "timeout_seconds",
    "index", "source", "sourcetype", "host", "max_in_flight",
} | TLS_KEYS


def validate_sink(v: Any, item: Any, path: str, index: int) -> SinkConfig | None:
    d = v.obj(item, path)
    if d is None:
        return None
    stype = v.string(d, "type", path, choices=SINK_TYPES)
    name = v.string(d, "name", path, required=False) or f"{stype}{index}"
    if stype is None:
        return None
    before = len(v.errors)
    if stype == "jsonl":
        v.unknown_keys(d, COMMON_KEYS | JSONL_KEYS, path)
        spath = v.file_path(d, "path", path, must_exist=False)
        params = _jsonl(v, d, path)
        if spath is None or len(v.errors) > before:
            return None
        return SinkConfig(type=stype, name=name, path=spath, params=params)
    if stype == "syslog":
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | SYSLOG_KEYS, path)
        params = _syslog(v, d, path)
    elif stype == "relp":
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | RELP_KEYS, path)
        params = _relp(v, d, path)
    else:
        v.unknown_keys(d, COMMON_KEYS | SPOOL_KEYS | HTTP_KEYS, path)
        params = _http(v, d, path)
    params.update(_spool(v, d, path))
    if len(v.errors) > before:
        return None
    return SinkConfig(type=stype, name=name, path=None, params=params)


def _jsonl(v: Any, d: dict, path: str) -> dict:
    params: dict = {"fsync": v.string(d, "fsync", path, required=False, choices=("always", "interval", "never")) or "interval"}
    interval = v.number(d, "fsync_interval_seconds", path, minimum=0.01)
    if interval is not None:
        params["fsync_interval_seconds"] = interval
    rotate_bytes = v.integer(d, "rotate_bytes", path, minimum=1024)
    if rotate_bytes is not None:
        params["rotate_bytes"] = rotate_bytes
    rotate_seconds = v.number(d, "rotate_seconds", path, minimum=1.0)
    if rotate_seconds is not None:
        params["rotate_seconds"] = rotate_seconds
    params["gzip"] = v.boolean(d, "gzip", path)
    return params


def _spool(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    spool_dir = v.file_path(d, "spool_dir", path, must_exist=False)
    if spool_dir is not None:
        params["spool_dir"] = spool_dir
    params["on_full"] = v.string(d, "on_spool_full", path, required=False, choices=("fail_closed", "drop_oldest")) or "fail_closed"
    _bounded(params, v.integer, d, path, (("spool_max_bytes", 16 * 1024), ("batch_max_events", 1), ("batch_max_bytes", 1024)))
    _bounded(params, v.number, d, path, (("retry_initial_seconds", 0.01), ("retry_max_seconds", 0.01), ("shutdown_flush_seconds", 0.0), ("batch_linger_seconds", 0.0)))
    return params


def _bounded(params: dict, getter: Any, d: dict, path: str, limits: tuple) -> None:
    """``params[key]`` for each (key, minimum) present in ``d``, checked by ``getter``
    (``v.integer`` / ``v.number``); absent keys keep the sink's own default."""
    for key, minimum in limits:
        value = getter(d, key, path, minimum=minimum)
        if value is not None:
            params[key] = value


def _tls(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    for key in ("ca_file", "cert_file", "key_file"):
        f = v.file_path(d, key, path, required=False)
        if f is not None:
            params[key] = f
    if ("cert_file" in d) != ("key_file" in d):
        v.err(path, "both \"cert_file\" and \"key_file\" (a client certificate) or neither")
    server_name = v.string(d, "server_name", path, required=False)
    if server_name is not None:
        params["server_name"] = server_name
    return params


def _syslog(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    addr = v.address(d, "address", path)
    if addr is not None:
        params["host"], params["port"] = addr
    transport = v.string(d, "transport", path, required=False, choices=("tcp", "tls", "udp")) or "tcp"
    params["transport"] = transport
    tls = _tls(v, d, path)
    if transport != "tls" and tls:
        v.err(path, f"no TLS keys ({', '.join(sorted(tls))}) with transport {transport!r}")
    params.update(tls)
    confirm = v.string(d, "confirm", path, required=False, choices=("close", "none"))
    if confirm is not None:
        if transport == "udp":
            v.err(join(path, "confirm"), "no \"confirm\" with transport \"udp\" (datagrams are never confirmed)")
        params["confirm"] = confirm
    _message_format(v, d, path, params)
    _bounded(params, v.number, d, path, (("confirm_timeout_seconds", 0.1), ("connect_timeout_seconds", 0.1)))
    return params


def _relp(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    addr = v.address(d, "address", path)
    if addr is not None:
        params["host"], params["port"] = addr
    _message_format(v, d, path, params)
    _bounded(params, v.integer, d, path, (("window", 1),))
    if params.get("window", 0) > 65536:
        v.err(join(path, "window"), f"at most 65536 unacknowledged frames, got {params['window']}")
    _bounded(params, v.number, d, path, (("ack_timeout_seconds", 0.1), ("connect_timeout_seconds", 0.1)))
    return params


def _message_format(v: Any, d: dict, path: str, params: dict) -> None:
    """The RFC 5424 message keys syslog and relp share."""
    if "facility" in d:
        from dbproxy.audit.sinks.syslog import FACILITIES

        fac = d["facility"]
        if isinstance(fac, str) and fac in FACILITIES:
            params["facility"] = FACILITIES[fac]
        elif isinstance(fac, int) and not isinstance(fac, bool) and 0 <= fac <= 23:
            params["facility"] = fac
        else:
            v.err(join(path, "facility"), f"a facility name ({', '.join(FACILITIES)}) or 0-23, got {fac!r}")
    for key in ("app_name", "hostname", "sd_id"):
        value = v.string(d, key, path, required=False)
        if value is not None:
            params[key] = value
    params["body"] = v.string(d, "format", path, required=False, choices=("json", "structured")) or "json"
    params["utf8_bom"] = v.boolean(d, "utf8_bom", path)


def _http(v: Any, d: dict, path: str) -> dict:
    params: dict = {}
    url = v.string(d, "url", path)
    if url is not None:
        if not url.startswith(("http://", "https://")):
            v.err(join(path, "url"), f"an http:// or https:// URL, got {url!r}")
        params["url"] = url
    params["format"] = v.string(d, "format", path, required=False, choices=("hec", "ndjson")) or "hec"
    if "token_file" in d and "token_env" in d:
        v.err(path, "only one of \"token_file\" or \"token_env\"")
    elif "token_file" in d:
        f = v.file_path(d, "token_file", path)
        if f is not None:
            params["token"] = SecretRef(file=f)
    elif "token_env" in d:
        env = v.string(d, "token_env", path)
        if env is not None:
            if env not in os.environ:
                v.err(join(path, "token_env"), f"environment variable {env} to be set")
            params["token"] = SecretRef(env=env)
    elif params["format"] == "hec":
        v.err(path, "\"token_file\" or \"token_env\" (the HEC token) for format \"hec\"")
    params["gzip"] = v.boolean(d, "gzip", path, default=True)
    if "headers" in d:
        headers = v.obj(d["headers"], join(path, "headers"))
        if headers is not None:
            for k, val in headers.items():
                if not isinstance(val, str) or k.lower() in ("authorization", "content-length", "content-encoding", "host"):
                    v.err(join(join(path, "headers"), k), "a string value for a header the sink does not set itself")
            params["headers"] = {k: val for k, val in headers.items() if isinstance(val, str)}
    params.update(_tls(v, d, path))
    value = v.number(d, "timeout_seconds", path, minimum=0.1)
    if value is not None:
        params["timeout_seconds"] = value
    _bounded(params, v.integer, d, path, (("max_in_flight", 1),))
    if params.get("max_in_flight", 0) > 64:
        v.err(join(path, "max_in_flight"), f"at most 64 concurrent requests, got {params['max_in_flight']}")
    hec = {k: d[k] for k in ("index", "source", "sourcetype", "host") if v.string(d, k, path, required=False)}
    if hec:
        params["hec_fields"] = hec
    return params


