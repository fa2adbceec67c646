"""Signatures and the AES envelope, as WeChat's message-push doc defines them.
https://developers.weixin.qq.com/miniprogram/dev/framework/server-ability/message-push.html

The module opens with the published known-answer vectors (tests/vectors/), then hand-derived
vectors and negatives that we build here with pycryptodome directly (never with wxgate), then
the key rules, and only then round trips. Each negative asserts the exception type and
WeChat's code.
"""

import base64
import hashlib
import re
import struct

import pytest
from Crypto.Cipher import AES

import wxgate

from conftest import VECTORS
KNOWN_KINDS = {"url_signature", "decrypt", "encrypt", "encrypt_only", "decrypt_wecom_echostr"}


def _cases(*kinds):
    return [pytest.param(case, id=case["id"]) for case in VECTORS if case["kind"] in kinds]


def _vector(case_id):
    (case,) = [case for case in VECTORS if case["id"] == case_id]
    return case


URL_CASES = _cases("url_signature")
DECRYPT_CASES = _cases("decrypt")
ENCRYPT_CASES = _cases("encrypt", "encrypt_only")
# Every case that carries a ciphertext. WeCom's encrypted echostr is here as a cipher vector
# only: a mini program's handshake is never encrypted.
CIPHER_CASES = _cases("decrypt", "encrypt", "encrypt_only", "decrypt_wecom_echostr")
MSG_SIGNED_CASES = [
    param for param in CIPHER_CASES
    if "msg_signature" in param.values[0] or "msg_signature_derived" in param.values[0]
]


# Independent helpers: WeChat's AES scheme written with pycryptodome only.

def _raw_key(encoding_aes_key):
    return base64.b64decode(encoding_aes_key + "=")


def _seal(padded, key):
    """AES-256-CBC encrypt an already padded buffer with iv = key[:16] and Base64 it."""
    cipher = AES.new(key, AES.MODE_CBC, iv=key[:16])
    return base64.b64encode(cipher.encrypt(padded)).decode("ascii")


def _open(encrypt, key):
    """Base64-decode and AES-256-CBC decrypt, leaving the padding in place."""
    cipher = AES.new(key, AES.MODE_CBC, iv=key[:16])
    return cipher.decrypt(base64.b64decode(encrypt))


def _fullstr(message, appid, random, msg_len=None):
    if msg_len is None:
        msg_len = len(message)
    return random + struct.pack(">I", msg_len) + message + appid


def _pad32(data):
    count = 32 - len(data) % 32
    return data + bytes([count]) * count


def _sha1_sorted(*parts):
    return hashlib.sha1("".join(sorted(parts)).encode("utf-8")).hexdigest()


def test_vector_file_has_every_kind():
    # Guards the tables below: a renamed kind would silently drop a whole group of cases.
    assert len(VECTORS) == 7
    assert {case["kind"] for case in VECTORS} == KNOWN_KINDS
    assert len({case["id"] for case in VECTORS}) == len(VECTORS)


# ---------------------------------------------------------------------------------------------
# Published vectors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", URL_CASES)
def test_url_signature_vector(case):
    assert wxgate.sign(case["token"], case["timestamp"], case["nonce"]) == case["signature"]
    assert wxgate.check_signature(
        case["signature"], case["token"], case["timestamp"], case["nonce"]) is None


@pytest.mark.parametrize("case", URL_CASES)
def test_url_signature_covers_the_query_only(case):
    # The handshake's echostr and a plaintext push's body are in no signature: a mini program
    # handshake is not WeCom's, whose msg_signature covers the (encrypted) echostr.
    extra = case["echostr"] if "echostr" in case else case["body"]
    assert wxgate.sign(case["token"], case["timestamp"], case["nonce"], extra) != case["signature"]
    with pytest.raises(wxgate.SignatureError):
        wxgate.check_signature(
            case["signature"], case["token"], case["timestamp"], case["nonce"], extra)


def test_handshake_vector_is_the_documented_example():
    case = _vector("mp_doc_handshake")
    # Sorted as strings, the three sort to 1514711492, 1714036504, AAAAA.
    assert sorted([case["token"], case["timestamp"], case["nonce"]]) == [
        "1514711492", "1714036504", "AAAAA"]
    assert case["echostr"] == "4375120948345356249"
    assert wxgate.sign("AAAAA", "1714036504", "1514711492") == (
        "f464b24fc39322e44b38aa78f5edd27bd1441696")


@pytest.mark.parametrize("case", MSG_SIGNED_CASES)
def test_msg_signature_vector(case):
    expected = case.get("msg_signature") or case["msg_signature_derived"]
    args = (case["token"], case["timestamp"], case["nonce"])
    assert wxgate.sign(*args, case["encrypt"]) == expected
    assert wxgate.check_signature(expected, *args, encrypt=case["encrypt"]) is None


@pytest.mark.parametrize("case", DECRYPT_CASES)
def test_decrypt_vector_url_signature(case):
    # A safe-mode push still carries a valid `signature` over token, timestamp and nonce.
    expected = case.get("signature") or case["signature_derived"]
    assert wxgate.sign(case["token"], case["timestamp"], case["nonce"]) == expected
    assert wxgate.check_signature(
        expected, case["token"], case["timestamp"], case["nonce"]) is None


@pytest.mark.parametrize("case", CIPHER_CASES)
def test_decrypt_message_vector(case):
    text = wxgate.decrypt_message(case["encrypt"], case["encoding_aes_key"], case["appid"])
    assert type(text) is str
    assert text == case["plaintext"]


@pytest.mark.parametrize("case", CIPHER_CASES)
def test_decrypt_buffer_vector(case):
    assert wxgate._decrypt_buffer(case["encrypt"], case["encoding_aes_key"]) == (
        case["random"].encode("ascii"), case["plaintext"], case["appid"])


@pytest.mark.parametrize("case", CIPHER_CASES)
def test_encrypt_message_vector(case):
    encrypt = wxgate.encrypt_message(
        case["plaintext"], case["encoding_aes_key"], case["appid"],
        random_prefix=case["random"].encode("ascii"))
    assert encrypt == case["encrypt"]


@pytest.mark.parametrize("case", ENCRYPT_CASES)
def test_encrypt_vector_signs_the_reply(case):
    # The reply direction: encrypt with the pinned prefix, then sign what we produced.
    expected = case.get("msg_signature") or case["msg_signature_derived"]
    encrypt = wxgate.encrypt_message(
        case["plaintext"], case["encoding_aes_key"], case["appid"],
        random_prefix=case["random"].encode("ascii"))
    assert wxgate.sign(case["token"], case["timestamp"], case["nonce"], encrypt) == expected


@pytest.mark.parametrize("case", CIPHER_CASES)
def test_vector_derived_lengths(case):
    # An independent decode of each vector with pycryptodome: checks the vector's `derived`
    # numbers and the byte layout that wxgate must agree with.
    derived = case["derived"]
    message = case["plaintext"].encode("utf-8")
    appid = case["appid"].encode("ascii")
    ciphertext = base64.b64decode(case["encrypt"], validate=True)
    assert len(ciphertext) == derived["ciphertext_bytes"]
    assert len(ciphertext) % 32 == 0

    buffer = _open(case["encrypt"], _raw_key(case["encoding_aes_key"]))
    pad = buffer[-1]
    assert pad == derived["pad_byte"]
    assert buffer[-pad:] == bytes([pad]) * pad
    fullstr = buffer[:-pad]
    assert len(fullstr) == derived["fullstr_bytes"] == 16 + 4 + len(message) + len(appid)
    assert pad == 32 - derived["fullstr_bytes"] % 32

    assert fullstr[:16] == case["random"].encode("ascii")
    (msg_len,) = struct.unpack(">I", fullstr[16:20])
    assert msg_len == derived["msg_len"] == len(message)
    assert fullstr[20:20 + msg_len] == message
    assert fullstr[20 + msg_len:] == appid


@pytest.mark.parametrize("case", CIPHER_CASES)
def test_encrypt_message_accepts_str_or_raw_key(case):
    raw_key = _raw_key(case["encoding_aes_key"])
    assert len(raw_key) == 32
    prefix = case["random"].encode("ascii")
    from_text = wxgate.encrypt_message(
        case["plaintext"], case["encoding_aes_key"], case["appid"], random_prefix=prefix)
    from_bytes = wxgate.encrypt_message(
        case["plaintext"], raw_key, case["appid"], random_prefix=prefix)
    assert from_text == from_bytes == case["encrypt"]


@pytest.mark.parametrize("case", CIPHER_CASES)
def test_encrypt_message_accepts_bytes_plaintext(case):
    prefix = case["random"].encode("ascii")
    encrypt = wxgate.encrypt_message(
        case["plaintext"].encode("utf-8"), case["encoding_aes_key"], case["appid"],
        random_prefix=prefix)
    assert encrypt == case["encrypt"]


# ---------------------------------------------------------------------------------------------
# Hand-derived signatures
# ---------------------------------------------------------------------------------------------

HANDSHAKE = _vector("mp_doc_handshake")
SAFE_PUSH = _vector("mp_doc_safe_push_json")


def _bump_digit(text, index=-1):
    """Change one decimal digit (the last by default) of `text`."""
    chars = list(text)
    chars[index] = str((int(chars[index]) + 1) % 10)
    return "".join(chars)


_H = (HANDSHAKE["token"], HANDSHAKE["timestamp"], HANDSHAKE["nonce"])
_P = (SAFE_PUSH["token"], SAFE_PUSH["timestamp"], SAFE_PUSH["nonce"])
_HSIG = HANDSHAKE["signature"]
_PSIG = SAFE_PUSH["msg_signature"]
_PENC = SAFE_PUSH["encrypt"]

# (signature, token, timestamp, nonce, encrypt): each must raise SignatureError, nothing else.
SIGNATURE_NEGATIVES = [
    pytest.param(_HSIG, _H[0], _H[1], _bump_digit(_H[2]), None, id="nonce one digit changed"),
    pytest.param(_HSIG, _H[0], _H[1], _bump_digit(_H[2], 0), None,
                 id="nonce first digit changed"),
    pytest.param(_HSIG, _H[0], _bump_digit(_H[1]), _H[2], None,
                 id="timestamp one digit changed"),
    pytest.param(_HSIG, "aaaaa", _H[1], _H[2], None, id="token in other case"),
    pytest.param(_PSIG, _P[0], _P[1], _bump_digit(_P[2]), _PENC,
                 id="msg_signature nonce one digit changed"),
    pytest.param(_PSIG, *_P, "/" + _PENC[1:], id="encrypt one character changed"),
    pytest.param(_PSIG, *_P, None, id="msg_signature checked without encrypt"),
    pytest.param(SAFE_PUSH["signature"], *_P, _PENC, id="url signature used as msg_signature"),
    pytest.param("z" * 40, *_H, None, id="signature not hex"),
    pytest.param(_HSIG[:-1] + "g", *_H, None, id="signature last char not hex"),
    pytest.param(_HSIG[:-1], *_H, None, id="signature truncated"),
    pytest.param(_HSIG * 2, *_H, None, id="signature doubled"),
    pytest.param(_HSIG + "\n", *_H, None, id="signature trailing newline"),
    pytest.param(" " + _HSIG, *_H, None, id="signature leading space"),
    pytest.param("", *_H, None, id="signature empty"),
    pytest.param("é" + _HSIG[1:], *_H, None, id="signature non-ASCII"),
    pytest.param("签名", *_H, None, id="signature CJK"),
    pytest.param("\udc80" * 40, *_H, None, id="signature lone surrogate"),
    pytest.param("\x00" * 40, *_H, None, id="signature NUL bytes"),
    pytest.param(_HSIG, _H[0], _H[1], "é", None, id="nonce non-ASCII"),
    pytest.param(_HSIG, _H[0], _H[1], "\udcff", None, id="nonce lone surrogate"),
]


@pytest.mark.parametrize("signature, token, timestamp, nonce, encrypt", SIGNATURE_NEGATIVES)
def test_check_signature_rejects(signature, token, timestamp, nonce, encrypt):
    with pytest.raises(wxgate.SignatureError) as info:
        wxgate.check_signature(signature, token, timestamp, nonce, encrypt)
    assert isinstance(info.value, wxgate.WxgateError)
    assert info.value.code == -40001
    assert info.value.status == 403


def test_sign_sorts_as_strings_not_numbers():
    # Numerically 99 < 1714036504; as strings "1714036504" < "99", and WeChat sorts strings.
    expected = hashlib.sha1(b"1714036504" + b"99" + b"AAAAA").hexdigest()
    assert wxgate.sign("AAAAA", "1714036504", "99") == expected
    assert wxgate.sign("AAAAA", "1714036504", "99") != hashlib.sha1(
        b"99" + b"1714036504" + b"AAAAA").hexdigest()


def test_sign_sorts_encrypt_with_the_rest():
    # The doc's Encrypt starts with "+", which sorts before every digit: the order is
    # Encrypt, timestamp 1714112445, nonce 415670741, token AAAAA.
    assert _PENC.startswith("+")
    assert wxgate.sign(*_P, _PENC) == hashlib.sha1(
        (_PENC + _P[1] + _P[2] + _P[0]).encode("ascii")).hexdigest() == _PSIG


def test_sign_is_lowercase_hex():
    for args in [_H, (*_P, _PENC), ("", "", ""), ("令牌", "1", "2")]:
        signature = wxgate.sign(*args)
        assert re.fullmatch("[0-9a-f]{40}", signature)
        assert signature == _sha1_sorted(*args)


def test_signature_error_names_no_secret():
    token = "s3cr3t-T0ken-value"
    expected = wxgate.sign(token, *_H[1:])
    with pytest.raises(wxgate.SignatureError) as info:
        wxgate.check_signature("0" * 40, token, *_H[1:])
    assert token not in str(info.value)
    # The expected signature would let anyone who reads the message forge this request.
    assert expected not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Hand-derived ciphertexts (pycryptodome only)
# ---------------------------------------------------------------------------------------------

KEY_TEXT = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
KEY = _raw_key(KEY_TEXT)
APPID = "wx2c2769f8efd9abc2"
APPID_BYTES = APPID.encode("ascii")
RANDOM = b"0123456789abcdef"


def _good(message):
    return _pad32(_fullstr(message, APPID_BYTES, RANDOM))


# A good ciphertext: 43-byte FullStr, 21 bytes of padding, 64 bytes, Base64 ending in "==".
GOOD_RAW = AES.new(KEY, AES.MODE_CBC, iv=KEY[:16]).encrypt(_good(b"hello"))
GOOD = base64.b64encode(GOOD_RAW).decode("ascii")
GOOD_URLSAFE = base64.urlsafe_b64encode(GOOD_RAW).decode("ascii")
assert GOOD.endswith("==") and GOOD_URLSAFE != GOOD

# 25-byte message: FullStr is 16 + 4 + 25 + 18 = 63 bytes, one short of two blocks.
MSG_63 = b"m" * 25
# 26-byte message: FullStr is 64 bytes, so the pad is a whole block of 0x20.
MSG_64 = b"a" * 26

# (plaintext, encrypt): strict decrypt must accept these, and encrypt_message with the same
# prefix must produce them byte for byte.
HAND_VECTORS = [
    pytest.param("a" * 26, _seal(_fullstr(MSG_64, APPID_BYTES, RANDOM) + b"\x20" * 32, KEY),
                 id="full pad of 32 when aligned"),
    pytest.param("m" * 25, _seal(_fullstr(MSG_63, APPID_BYTES, RANDOM) + b"\x01", KEY),
                 id="pad of 1"),
    pytest.param("", _seal(_fullstr(b"", APPID_BYTES, RANDOM) + b"\x1a" * 26, KEY),
                 id="empty message"),
    pytest.param("我是中文", _seal(_good("我是中文".encode("utf-8")), KEY),
                 id="multi-byte UTF-8 counted in bytes"),
    pytest.param("x" * 1000, _seal(_good(b"x" * 1000), KEY), id="many blocks"),
]


@pytest.mark.parametrize("plaintext, encrypt", HAND_VECTORS)
def test_hand_vector_decrypts(plaintext, encrypt):
    assert wxgate.decrypt_message(encrypt, KEY_TEXT, APPID) == plaintext
    assert wxgate._decrypt_buffer(encrypt, KEY_TEXT) == (RANDOM, plaintext, APPID)


@pytest.mark.parametrize("plaintext, encrypt", HAND_VECTORS)
def test_hand_vector_encrypts(plaintext, encrypt):
    assert wxgate.encrypt_message(plaintext, KEY_TEXT, APPID, random_prefix=RANDOM) == encrypt


def _wrong_appid(appid):
    return _seal(_pad32(_fullstr(b"hello", appid, RANDOM)), KEY)


# (encrypt, code): strict decrypt with KEY_TEXT and APPID must raise DecryptError(code).
DECRYPT_NEGATIVES = [
    # -40005: the buffer is well formed but names another app.
    pytest.param(_wrong_appid(b"wx0000000000000000"), -40005, id="appid mismatch"),
    pytest.param(_wrong_appid(APPID_BYTES[:-1]), -40005, id="appid truncated"),
    pytest.param(_wrong_appid(APPID_BYTES + b"0"), -40005, id="appid with extra char"),
    pytest.param(_wrong_appid(APPID_BYTES.upper()), -40005, id="appid in other case"),
    pytest.param(_wrong_appid(b""), -40005, id="appid empty"),
    pytest.param(_seal(_pad32(RANDOM + b"\x00\x00\x00\x00"), KEY), -40005,
                 id="20-byte buffer, no message, no appid"),
    pytest.param(_seal(_pad32(_fullstr(b"hello", APPID_BYTES, RANDOM, msg_len=5 + 18)), KEY),
                 -40005, id="length swallows appid"),
    pytest.param(_seal(_pad32(_fullstr(b"hello", APPID_BYTES, RANDOM, msg_len=3)), KEY),
                 -40005, id="length short, appid misread"),
    # -40008: the decrypted buffer is malformed.
    pytest.param(_seal(_fullstr(MSG_63, APPID_BYTES, RANDOM) + b"\x00", KEY), -40008,
                 id="pad byte 0"),
    pytest.param(_seal(_fullstr(MSG_63, APPID_BYTES, RANDOM) + b"\x21" * 33, KEY), -40008,
                 id="pad byte 33"),
    pytest.param(_seal(_fullstr(MSG_63, APPID_BYTES, RANDOM) + b"\xff", KEY), -40008,
                 id="pad byte 255"),
    pytest.param(_seal(_fullstr(b"m" * 21, APPID_BYTES, RANDOM) + b"\x04\x05\x05\x05\x05", KEY),
                 -40008, id="pad bytes differ"),
    pytest.param(_seal(_fullstr(MSG_64, APPID_BYTES, RANDOM) + b"\x1f" + b"\x20" * 31, KEY),
                 -40008, id="pad bytes differ in a full block"),
    pytest.param(_seal(_pad32(_fullstr(b"hello", APPID_BYTES, RANDOM, msg_len=5 + 18 + 1)), KEY),
                 -40008, id="length past end by one"),
    pytest.param(_seal(_pad32(_fullstr(b"hello", APPID_BYTES, RANDOM, msg_len=0xFFFFFFFF)), KEY),
                 -40008, id="length 0xffffffff"),
    pytest.param(_seal(_good(b"\xff\xfe\xfd"), KEY), -40008, id="message not UTF-8"),
    pytest.param(_seal(_good(b"caf\xc3"), KEY), -40008, id="message truncated UTF-8"),
    pytest.param(_seal(_good(b"\xed\xa0\x80"), KEY), -40008, id="message encoded surrogate"),
    pytest.param(_seal(_pad32(RANDOM + b"\x00\x00\x00"), KEY), -40008,
                 id="buffer of 19 bytes"),
    pytest.param(_seal(b"\x20" * 32, KEY), -40008, id="buffer of padding only"),
    pytest.param(_seal(RANDOM + b"\x00\x00" + b"\x0e" * 14, KEY), -40008,
                 id="pad leaves 18 bytes"),
    # -40010: not strict Base64.
    pytest.param(GOOD[:10] + "!" + GOOD[10:], -40010, id="base64 stray !"),
    pytest.param(GOOD[:10] + " " + GOOD[10:], -40010, id="base64 space inside"),
    pytest.param(GOOD[:44] + "\n" + GOOD[44:], -40010, id="base64 line break inside"),
    pytest.param(GOOD[:10] + "é" + GOOD[10:], -40010, id="base64 non-ASCII"),
    pytest.param(GOOD_URLSAFE, -40010, id="base64 URL-safe alphabet"),
    pytest.param(GOOD[:-2], -40010, id="base64 missing padding"),
    pytest.param(GOOD[:-1], -40010, id="base64 one padding char missing"),
    pytest.param(GOOD + "=", -40010, id="base64 excess padding"),
    pytest.param(GOOD[:8] + "=" + GOOD[9:], -40010, id="base64 padding inside"),
    # -40007: the ciphertext is not a non-zero multiple of 32 bytes.
    pytest.param("", -40007, id="ciphertext empty"),
    pytest.param(base64.b64encode(GOOD_RAW[:16]).decode("ascii"), -40007,
                 id="ciphertext 16 bytes"),
    pytest.param(_seal(_fullstr(b"hello", APPID_BYTES, RANDOM) + b"\x05" * 5, KEY), -40007,
                 id="ciphertext 48 bytes (16-byte PKCS7)"),
    pytest.param(base64.b64encode(GOOD_RAW[:33]).decode("ascii"), -40007,
                 id="ciphertext 33 bytes"),
    pytest.param(base64.b64encode(GOOD_RAW[:63]).decode("ascii"), -40007,
                 id="ciphertext 63 bytes"),
]


@pytest.mark.parametrize("encrypt, code", DECRYPT_NEGATIVES)
def test_decrypt_message_rejects(encrypt, code):
    with pytest.raises(wxgate.DecryptError) as info:
        wxgate.decrypt_message(encrypt, KEY_TEXT, APPID)
    assert isinstance(info.value, wxgate.WxgateError)
    assert info.value.code == code
    assert info.value.status == 400


@pytest.mark.parametrize("encrypt, code", [
    param for param in DECRYPT_NEGATIVES if param.values[1] != -40005])
def test_decrypt_buffer_rejects(encrypt, code):
    # The private reader skips only the appid check; every other rule still holds.
    with pytest.raises(wxgate.DecryptError) as info:
        wxgate._decrypt_buffer(encrypt, KEY_TEXT)
    assert info.value.code == code


@pytest.mark.parametrize("encrypt, code", [
    param for param in DECRYPT_NEGATIVES if len(param.values[0]) >= 16])
def test_decrypt_error_names_no_secret(encrypt, code):
    with pytest.raises(wxgate.DecryptError) as info:
        wxgate.decrypt_message(encrypt, KEY_TEXT, APPID)
    assert encrypt not in str(info.value)
    assert KEY_TEXT not in str(info.value)


def test_decrypt_buffer_reports_the_other_appid():
    encrypt = _wrong_appid(b"wx0000000000000000")
    assert wxgate._decrypt_buffer(encrypt, KEY_TEXT) == (RANDOM, "hello", "wx0000000000000000")


def test_decrypt_message_accepts_raw_key():
    case = _vector("oa_sample_python_decrypt")
    raw_key = _raw_key(case["encoding_aes_key"])
    assert wxgate.decrypt_message(case["encrypt"], raw_key, case["appid"]) == case["plaintext"]


# ---------------------------------------------------------------------------------------------
# EncodingAESKey
# ---------------------------------------------------------------------------------------------

KEY_VECTORS = [
    pytest.param("A" * 43, "00" * 32, id="all A"),
    pytest.param("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG",
                 "69b71d79f8218a39259a7a29aabb2dbafc31cb3d35db7e39ebbf3d0010831051",
                 id="abc...EFG unused bits set"),
]


@pytest.mark.parametrize("encoding_aes_key, key_hex", KEY_VECTORS)
def test_decode_aes_key(encoding_aes_key, key_hex):
    assert wxgate._decode_aes_key(encoding_aes_key) == bytes.fromhex(key_hex)


def test_key_with_unused_bits_does_not_round_trip():
    # Why wxgate must never validate a key by re-encoding it: the unused bits may be set.
    reencoded = base64.b64encode(bytes.fromhex(KEY_VECTORS[1].values[1])).decode("ascii")
    assert reencoded[:43] != KEY_TEXT
    assert reencoded[:42] == KEY_TEXT[:42]


BAD_KEYS = [
    pytest.param("A" * 42, id="42 characters"),
    pytest.param("A" * 44, id="44 characters"),
    pytest.param("A" * 43 + "=", id="44 characters ending in ="),
    pytest.param("", id="empty"),
    pytest.param("A" * 42 + "!", id="non-base64 character !"),
    pytest.param("A" * 42 + "-", id="URL-safe character -"),
    pytest.param("A" * 20 + "_" + "A" * 22, id="URL-safe character _ inside"),
    pytest.param("A" * 42 + "é", id="non-ASCII character"),
    pytest.param("A" * 21 + " " + "A" * 21, id="space inside"),
    pytest.param("A" * 42 + "\n", id="trailing newline"),
    pytest.param("A" * 42 + "=", id="padding inside, 31 bytes"),
]


@pytest.mark.parametrize("encoding_aes_key", BAD_KEYS)
def test_decode_aes_key_rejects(encoding_aes_key):
    with pytest.raises(wxgate.WxgateError) as info:
        wxgate._decode_aes_key(encoding_aes_key)
    assert info.value.code == -40004


def test_decode_aes_key_error_names_no_key():
    bad = "Zq9" * 14  # 42 characters of would-be secret
    with pytest.raises(wxgate.WxgateError) as info:
        wxgate._decode_aes_key(bad)
    assert bad not in str(info.value)


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------

ROUND_TRIP_MESSAGES = [
    pytest.param("", id="empty"),
    pytest.param("我是中文abcd123 😀", id="multi-byte UTF-8"),
    pytest.param("a" * 26, id="aligned to 64, pad 32"),
    pytest.param("b" * 58, id="aligned to 96, pad 32"),
    pytest.param("é" * 13, id="aligned multi-byte, pad 32"),
    pytest.param("c" * 27, id="one past aligned, pad 31"),
    pytest.param("<xml>\n<Content><![CDATA[x]]></Content>\n</xml>", id="xml with newlines"),
    pytest.param("d" * 5000, id="long"),
]


@pytest.mark.parametrize("message", ROUND_TRIP_MESSAGES)
def test_round_trip(message):
    encrypt = wxgate.encrypt_message(message, KEY_TEXT, APPID)
    assert wxgate.decrypt_message(encrypt, KEY_TEXT, APPID) == message

    # The layout, read back without wxgate.
    body = message.encode("utf-8")
    fullstr_bytes = 20 + len(body) + len(APPID_BYTES)
    pad = 32 - fullstr_bytes % 32
    buffer = _open(encrypt, KEY)
    assert len(buffer) == fullstr_bytes + pad
    assert buffer[-pad:] == bytes([pad]) * pad
    assert buffer[16:20] == struct.pack(">I", len(body))
    assert buffer[20:20 + len(body)] == body
    assert buffer[20 + len(body):fullstr_bytes] == APPID_BYTES


def test_aligned_message_gets_a_whole_block_of_padding():
    encrypt = wxgate.encrypt_message("a" * 26, KEY_TEXT, APPID)
    buffer = _open(encrypt, KEY)
    assert len(buffer) == 96
    assert buffer[-32:] == b"\x20" * 32


def test_default_random_prefix():
    first = wxgate.encrypt_message("same text", KEY_TEXT, APPID)
    second = wxgate.encrypt_message("same text", KEY_TEXT, APPID)
    assert first != second
    prefixes = []
    for encrypt in (first, second):
        prefix, message, appid = wxgate._decrypt_buffer(encrypt, KEY_TEXT)
        assert (message, appid) == ("same text", APPID)
        assert len(prefix) == 16
        assert prefix == _open(encrypt, KEY)[:16]
        # The contract: 16 lowercase hex characters, like the prefixes WeChat sends.
        assert re.fullmatch(rb"[0-9a-f]{16}", prefix)
        prefixes.append(prefix)
    assert prefixes[0] != prefixes[1]
