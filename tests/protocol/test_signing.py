"""Agent request signatures: the documented vectors, and what a signature covers."""
from __future__ import annotations

import base64
import hashlib
import hmac
import re

import pytest
from itsdangerous import Signer

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


def _vector_id(vector: dict[str, str]) -> str:
    return vector["method"] + (" with nonce" if vector.get("nonce") else "")


def test_protocol_doc_has_a_post_with_a_nonce_and_the_older_vectors_without():
    assert sorted(map(_vector_id, documented_vectors())) == ["GET", "POST", "POST with nonce"]


@pytest.mark.parametrize("vector", documented_vectors(), ids=_vector_id)
def test_documented_vector_matches_the_code(vector):
    body, nonce = vector["body"].encode(), vector.get("nonce", "")
    assert hashlib.sha256(body).hexdigest() == vector["body-sha256"]
    signature = signing.sign(vector["secret"], vector["method"], vector["path"], vector["timestamp"], body, nonce)
    assert signature == vector["signature"]
    assert signing.verify(vector["secret"], signature, vector["method"], vector["path"], vector["timestamp"], body,
                          nonce)


@pytest.mark.parametrize("vector", documented_vectors(), ids=_vector_id)
def test_documented_recipe_without_itsdangerous_gives_the_same_signature(vector):
    # The two-step HMAC the doc spells out for agents in other languages.
    key = hmac.new(vector["secret"].encode(), signing.SALT.encode(), hashlib.sha256).digest()
    lines = [vector["method"], vector["path"], vector["timestamp"], vector["body-sha256"]]
    message = "\n".join(lines + ([vector["nonce"]] if vector.get("nonce") else []))
    mac = hmac.new(key, message.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == vector["signature"]


@pytest.mark.parametrize("vector", documented_vectors(), ids=_vector_id)
def test_itsdangerous_signer_gives_the_documented_signature(vector):
    signer = Signer(vector["secret"], salt=signing.SALT, key_derivation="hmac", digest_method=hashlib.sha256)
    signed = signing.string_to_sign(vector["method"], vector["path"], vector["timestamp"], vector["body"].encode(),
                                    vector.get("nonce", ""))
    assert signer.get_signature(signed).decode() == vector["signature"]


def test_a_nonce_is_a_fifth_line_and_a_signature_without_it_does_not_verify_with_it():
    nonce = signing.new_nonce()
    assert signing.NONCE.fullmatch(nonce)
    assert signing.string_to_sign("GET", "/p", "17", b"", nonce).split(b"\n")[4] == nonce.encode()
    without = signing.sign("s3cret", "GET", "/p", "17", b"")
    assert not signing.verify("s3cret", without, "GET", "/p", "17", b"", nonce)
    assert not signing.verify("s3cret", signing.sign("s3cret", "GET", "/p", "17", b"", nonce), "GET", "/p", "17", b"")


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


def test_signed_headers_carry_id_timestamp_a_fresh_nonce_and_signature():
    headers = signing.signed_headers("agt_1", "s3cret", "GET", "/api/v1/inference/poll", b"", 1700000000.9)
    nonce = headers["X-Agent-Nonce"]
    assert headers == {
        "X-Agent-Id": "agt_1",
        "X-Agent-Timestamp": "1700000000",
        "X-Agent-Nonce": nonce,
        "X-Agent-Signature": signing.sign("s3cret", "GET", "/api/v1/inference/poll", "1700000000", b"", nonce),
    }
    again = signing.signed_headers("agt_1", "s3cret", "GET", "/api/v1/inference/poll", b"", 1700000000.9)
    assert again["X-Agent-Nonce"] != nonce


def test_signed_headers_without_a_nonce_sign_the_four_lines():
    headers = signing.signed_headers("agt_1", "s3cret", "GET", "/p", b"", 17, nonce="")
    assert "X-Agent-Nonce" not in headers and headers["X-Agent-Signature"] == signing.sign("s3cret", "GET", "/p",
                                                                                             "17", b"")
