"""Agent request signatures: the documented vectors, and what a signature covers."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest

from devtools.processes import ROOT
from protocol import signing

PROTOCOL_DOC = ROOT / "docs" / "protocol.md"


def documented_vectors() -> list[dict[str, str]]:
    """Each ``<!-- signing-vector -->`` block of docs/protocol.md as a dict."""
    text = PROTOCOL_DOC.read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- signing-vector -->\s*```\n(.*?)```", text, re.S)
    vectors = []
    for block in blocks:
        fields = {}
        for line in block.splitlines():
            name, _, value = line.partition(":")
            fields[name.strip()] = value.strip()
        vectors.append(fields)
    return vectors


def test_protocol_doc_has_a_post_and_a_get_vector():
    assert sorted(v["method"] for v in documented_vectors()) == ["GET", "POST"]


@pytest.mark.parametrize("vector", documented_vectors(), ids=lambda v: v["method"])
def test_documented_vector_matches_the_code(vector):
    body = vector["body"].encode()
    assert hashlib.sha256(body).hexdigest() == vector["body-sha256"]
    signature = signing.sign(vector["secret"], vector["method"], vector["path"], vector["timestamp"], body)
    assert signature == vector["signature"]
    assert signing.verify(vector["secret"], signature, vector["method"], vector["path"], vector["timestamp"], body)


@pytest.mark.parametrize("vector", documented_vectors(), ids=lambda v: v["method"])
def test_documented_recipe_without_itsdangerous_gives_the_same_signature(vector):
    # The two-step HMAC the doc spells out for agents in other languages.
    key = hmac.new(vector["secret"].encode(), signing.SALT.encode(), hashlib.sha256).digest()
    message = "\n".join([vector["method"], vector["path"], vector["timestamp"], vector["body-sha256"]])
    mac = hmac.new(key, message.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == vector["signature"]


def test_string_to_sign_is_four_lines_without_trailing_newline():
    signed = signing.string_to_sign("post", "/p?a=1", "17", b"{}")
    assert signed == b"POST\n/p?a=1\n17\n" + hashlib.sha256(b"{}").hexdigest().encode()


SIGNED = ("s3cret", "POST", "/api/v1/inference/stream?x=1", "1700000000", b'{"id":"j"}')


@pytest.mark.parametrize("changed", [
    ("other-secret", *SIGNED[1:]),
    (SIGNED[0], "GET", *SIGNED[2:]),
    (SIGNED[0], SIGNED[1], "/api/v1/inference/stream?x=2", *SIGNED[3:]),
    (SIGNED[0], SIGNED[1], "/api/v1/inference/stream", *SIGNED[3:]),
    (*SIGNED[:3], "1700000001", SIGNED[4]),
    (*SIGNED[:4], b'{"id":"k"}'),
    (*SIGNED[:4], b""),
], ids=["secret", "method", "query", "no-query", "timestamp", "body", "empty-body"])
def test_signature_covers_secret_method_path_query_timestamp_and_body(changed):
    signature = signing.sign(*SIGNED)
    assert signing.verify(SIGNED[0], signature, *SIGNED[1:])
    secret, *request = changed
    assert not signing.verify(secret, signature, *request)


@pytest.mark.parametrize("garbage", ["", "x", "é" * 43, signing.sign(*SIGNED)[:-1]])
def test_malformed_signature_is_rejected_not_raised(garbage):
    assert not signing.verify(*SIGNED[:1], garbage, *SIGNED[1:])


def test_signed_headers_carry_id_timestamp_and_signature():
    headers = signing.signed_headers("agt_1", "s3cret", "GET", "/api/v1/inference/poll", b"", 1700000000.9)
    assert headers == {
        "X-Agent-Id": "agt_1",
        "X-Agent-Timestamp": "1700000000",
        "X-Agent-Signature": signing.sign("s3cret", "GET", "/api/v1/inference/poll", "1700000000", b""),
    }
