"""What the Redfish engine changes in relayed messages (engines/redfish/codec.py): credentials out both
ways, Location rewritten, Redfish error bodies, action bodies, the BMC's error message, redaction."""

from __future__ import annotations

import base64

import orjson
import pytest
from hypothesis import given, strategies as st

from dbproxy.engines.redfish import codec

BMC = ("http://10.0.0.5:8000", "https://10.0.0.5:8000", "http://10.0.0.5", "https://10.0.0.5")


def test_client_credentials_bearer_basic_and_x_auth_token():
    assert codec.client_credentials((("authorization", "Bearer abc.def.ghi"),)) == ("bearer", None, "abc.def.ghi")
    basic = base64.b64encode(b"alice:abc.def.ghi").decode()
    assert codec.client_credentials((("authorization", f"Basic {basic}"),)) == ("basic", "alice", "abc.def.ghi")
    empty_user = base64.b64encode(b":tok").decode()
    assert codec.client_credentials((("authorization", f"basic {empty_user}"),)) == ("basic", None, "tok")
    assert codec.client_credentials((("x-auth-token", " tok "),)) == ("x-auth-token", None, "tok")
    assert codec.client_credentials((("accept", "*/*"),)) is None
    assert codec.client_credentials((("authorization", "Basic !!!"),))[0] == "bad"
    assert codec.client_credentials((("authorization", "Digest x"),))[0] == "bad"
    no_colon = base64.b64encode(b"nocolon").decode()
    assert codec.client_credentials((("authorization", f"Basic {no_colon}"),))[0] == "bad"


def test_request_headers_lose_the_clients_credentials_and_hop_by_hop():
    headers = (("host", "bmc-1.proxy:8443"), ("authorization", "Bearer t"), ("x-auth-token", "t"),
               ("cookie", "a=b"), ("connection", "keep-alive, x-foo"), ("keep-alive", "5"),
               ("content-length", "5"), ("transfer-encoding", "chunked"), ("proxy-authorization", "x"),
               ("content-type", "application/json"), ("odata-version", "4.0"), ("if-match", '"e1"'))
    out = codec.client_request_headers(headers, "10.0.0.5:8000")
    assert out == [("host", "10.0.0.5:8000"), ("content-type", "application/json"), ("odata-version", "4.0"),
                   ("if-match", '"e1"')]


def test_response_headers_lose_bmc_credentials_and_address():
    raw = [(b"Content-Type", b"application/json"), (b"X-Auth-Token", b"bmc-session-token"),
           (b"Set-Cookie", b"sid=1"), (b"WWW-Authenticate", b'Basic realm="bmc"'), (b"Connection", b"close"),
           (b"Location", b"https://10.0.0.5:8000/redfish/v1/TaskService/Tasks/1"),
           (b"Content-Location", b"http://10.0.0.5/redfish/v1/Systems/1"), (b"Content-Length", b"12"),
           (b"ETag", b'"e1"')]
    out = codec.bmc_response_headers(raw, BMC)
    assert out == [("content-type", "application/json"), ("location", "/redfish/v1/TaskService/Tasks/1"),
                   ("content-location", "/redfish/v1/Systems/1"), ("content-length", "12"), ("etag", '"e1"')]
    # Only the BMC's own origin is rewritten (a prefix of a longer host name is another host).
    assert codec.local_location("http://10.0.0.55/x", BMC) == "http://10.0.0.55/x"
    assert codec.local_location("https://10.0.0.5:8000", BMC) == "/"


def test_target_from_host():
    assert codec.target_from_host("bmc-1.bmc.example.com:8443") == "bmc-1"
    assert codec.target_from_host("BMC-7") == "bmc-7"
    assert codec.target_from_host("127.0.0.1:8443") is None
    assert codec.target_from_host("[::1]:8443") is None
    assert codec.target_from_host("") is None and codec.target_from_host(None) is None
    assert codec.target_from_host("bad_label!.x") is None


def test_redfish_error_body():
    resp = codec.redfish_error(403, "no", code=None)
    body = orjson.loads(resp.body)
    assert resp.status == 403 and body["error"]["code"] == "Base.1.0.InsufficientPrivilege"
    assert body["error"]["message"] == "no"
    assert body["error"]["@Message.ExtendedInfo"][0]["MessageId"] == "Base.1.0.InsufficientPrivilege"
    assert ("content-type", "application/json; charset=utf-8") in resp.headers
    r401 = codec.redfish_error(401, "who")
    assert dict(r401.headers)["www-authenticate"].startswith('Basic realm="dbproxy"')
    assert orjson.loads(codec.redfish_error(502, "down").body)["error"]["code"] == \
        "Base.1.0.ServiceTemporarilyUnavailable"


def test_action_body():
    assert codec.parse_action_body(b'{"ResetType": "On"}') == {"ResetType": "On"}
    assert codec.parse_action_body(b"  ") == {}
    with pytest.raises(ValueError, match="not JSON"):
        codec.parse_action_body(b"ResetType=On")
    with pytest.raises(ValueError, match="JSON object"):
        codec.parse_action_body(b'["On"]')


def test_bmc_message():
    ext = {"error": {"code": "Base.1.0.GeneralError", "message": "outer",
                     "@Message.ExtendedInfo": [{"Message": "inner"}]}}
    assert codec.bmc_message(orjson.dumps(ext)) == "inner"
    assert codec.bmc_message(b'{"error": {"message": "only"}}') == "only"
    assert codec.bmc_message(b"PATCH only works for Boot") == "PATCH only works for Boot"
    assert codec.bmc_message(b'{"x": 1}') is None
    assert codec.bmc_message(b"") is None


def test_redact():
    params = {"ImageURI": "http://x/fw.bin", "Password": "p", "UserName": "u",
              "Nested": [{"AuthToken": "t", "ok": 1}], "PrivateKey": "k"}
    assert codec.redact(params) == {"ImageURI": "http://x/fw.bin", "Password": "***", "UserName": "u",
                                    "Nested": [{"AuthToken": "***", "ok": 1}], "PrivateKey": "***"}


@given(st.lists(st.tuples(st.sampled_from(["authorization", "x-auth-token", "cookie", "accept", "content-type",
                                           "connection", "host", "x-custom", "proxy-foo"]),
                          st.text(min_size=0, max_size=20)), max_size=12))
def test_no_client_credential_ever_crosses(headers):
    out = codec.client_request_headers(tuple(headers), "bmc:443")
    names = [k for k, _ in out]
    assert not set(names) & {"authorization", "x-auth-token", "cookie", "connection", "proxy-foo"}
    assert names.count("host") == 1 and out[0] == ("host", "bmc:443")
