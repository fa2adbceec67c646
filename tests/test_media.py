"""uploadTempMedia: a multipart upload with the standard library, parsed by the
fake WeChat as a strict RFC 7578 server would, and its media_id sent back as an image."""

import email.parser
import email.policy
import io
import os
import tempfile

import pytest

import wxgate
from conftest import APPID, OPENID
from fake_wechat import (DEFAULT_APPID, DEFAULT_SECRET, MEDIA_UPLOAD_PATH, FakeWeChat,
                         MultipartError, parse_multipart)
from wxgate import _encode_multipart as encode_multipart

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"IEND\xaeB`\x82"
# Everything a naive encoder or parser trips on: CRLFs, a "--" line, a boundary-looking line,
# a blank-line pair, NUL bytes, and a closing-delimiter lookalike at the very end.
NASTY = (b"\xff\xd8\xff\xe0\r\n--\r\n--abc\r\n\r\n\x00\x00\r\n--boundary\r\n"
         b"Content-Disposition: form-data; name=\"media\"\r\n\r\n\r\n--x--\r\n")


@pytest.fixture
def fake():
    with FakeWeChat() as fake:
        yield fake


@pytest.fixture
def client(fake):
    return wxgate.WeChatClient(wxgate.TokenManager(DEFAULT_APPID, DEFAULT_SECRET,
                                                   api_base=fake.url))


# -- the encoder, read back by the fake's independent parser --------------------------------


@pytest.mark.parametrize("data", [
    pytest.param(b"", id="empty"),
    pytest.param(PNG, id="png"),
    pytest.param(NASTY, id="CRLF and boundary-like lines"),
    pytest.param(bytes(range(256)) * 64, id="every byte"),
    pytest.param(b"\r\n" * 100, id="only CRLFs"),
    pytest.param(b"-f00d\r\n-f00d--\r\n--f00", id="near misses of the boundary"),
])
def test_encoded_body_parses_back_to_the_same_bytes(data):
    body = encode_multipart({"type": "image"}, {"media": ("a.jpg", data, "image/jpeg")},
                            "f00d")
    parts = parse_multipart(body.content_type, body.data)
    assert set(parts) == {"type", "media"}
    assert parts["type"].data == b"image" and parts["type"].filename is None
    media = parts["media"]
    assert (media.filename, media.content_type, media.data) == ("a.jpg", "image/jpeg", data)


def test_the_standard_librarys_email_parser_reads_it_the_same_way():
    # A second, unrelated reader: Python's MIME parser, given the header the request sends.
    body = encode_multipart({}, {"media": ("x.png", NASTY, "image/png")}, "0123abcd")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + body.content_type.encode() + b"\r\n\r\n" + body.data)
    (part,) = message.iter_parts()
    assert part.get_param("name", header="content-disposition") == "media"
    assert part.get_filename() == "x.png" and part.get_content_type() == "image/png"
    assert part.get_payload(decode=True) == NASTY


def test_a_boundary_found_in_the_data_is_refused():
    with pytest.raises(ValueError, match="occurs in the data"):
        encode_multipart({}, {"media": ("a", b"x\r\n--abc\r\ny", "image/png")}, "abc")
    # Without the CRLF in front it would not end the part, but lax parsers exist: refused too.
    with pytest.raises(ValueError, match="occurs in the data"):
        encode_multipart({}, {"media": ("a", b"--abc--", "image/png")}, "abc")
    with pytest.raises(ValueError, match="not a valid multipart boundary"):
        encode_multipart({}, {}, "has space")


def test_names_are_escaped_as_browsers_do():
    body = encode_multipart({}, {"media": ('a"b\r\nc 图.png', b"1", "image/png")}, "b0")
    assert b'filename="a%22b%0D%0Ac \xe5\x9b\xbe.png"' in body.data
    assert parse_multipart(body.content_type, body.data)["media"].filename == \
        "a%22b%0D%0Ac 图.png"
    with pytest.raises(ValueError, match="line break"):
        encode_multipart({}, {"media": ("a", b"1", "image/png\r\nX-Evil: 1")}, "b0")


@pytest.mark.parametrize("content_type, body, match", [
    ("multipart/form-data", b"", "bad boundary"),
    ("multipart/form-data; boundary=b", b"--b\r\n\r\nx\r\n--b--", "Content-Disposition"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=m\r\n"
     b"\r\nx", "not closed"),
    ("multipart/form-data; boundary=b", b"xx--b\r\n", "does not start"),
    ("multipart/form-data; boundary=b", b"--b\r\nContent-Disposition: form-data; name=m\r\n"
     b"\r\nx\r\n--b--junk", "after the closing"),
    ("text/plain; boundary=b", b"--b--", "not multipart"),
])
def test_the_fakes_parser_is_strict(content_type, body, match):
    with pytest.raises(MultipartError, match=match):
        parse_multipart(content_type, body)


# -- upload_temp_media against the fake WeChat -----------------------------------------------


def test_upload_bytes_returns_a_media_id_that_send_image_accepts(fake, client):
    media_id = client.upload_temp_media(NASTY)
    (upload,) = fake.uploads
    assert upload["media_id"] == media_id and upload["type"] == "image"
    assert upload["data"] == NASTY
    assert (upload["filename"], upload["content_type"]) == ("media.jpg", "image/jpeg")
    (request,) = [r for r in fake.requests if r.path == MEDIA_UPLOAD_PATH]
    assert request.method == "POST" and request.query["type"] == "image"
    assert request.query["access_token"] in fake.issued_tokens
    client.send_image(OPENID, media_id)
    assert fake.custom_messages == [{"touser": OPENID, "msgtype": "image",
                                     "image": {"media_id": media_id}}]


def test_upload_a_path_and_a_file_object(fake, client, tmp_path):
    path = tmp_path / "商品.png"
    path.write_bytes(PNG)
    client.upload_temp_media(path)
    client.upload_temp_media(str(path))
    with open(path, "rb") as file:
        client.upload_temp_media(file)
    client.upload_temp_media(io.BytesIO(PNG), filename="x.gif", content_type="image/gif")
    assert [(u["filename"], u["content_type"], u["data"]) for u in fake.uploads] == [
        ("商品.png", "image/png", PNG)] * 3 + [("x.gif", "image/gif", PNG)]


def test_a_rejected_token_gets_one_retry_with_the_same_body(fake, client):
    client.upload_temp_media(PNG)  # a token is fetched and stored
    fake.fail_next(MEDIA_UPLOAD_PATH, 40001)
    media_id = client.upload_temp_media(PNG)
    assert fake.calls[MEDIA_UPLOAD_PATH] == 3
    assert [u["media_id"] for u in fake.uploads][-1] == media_id
    assert fake.uploads[-1]["data"] == PNG


def test_wechat_errors_are_raised(fake, client):
    with pytest.raises(wxgate.WeChatAPIError) as caught:
        client.upload_temp_media(PNG, media_type="voice")  # mini programs: images only
    assert caught.value.errcode == 40004
    fake.fail_next(MEDIA_UPLOAD_PATH, 45009)
    with pytest.raises(wxgate.WeChatAPIError, match="45009"):
        client.upload_temp_media(PNG)
    with pytest.raises(ValueError, match="media_type"):
        client.upload_temp_media(PNG, media_type="image&type=x")
    assert fake.uploads == [] and fake.errors == []


def test_the_fake_refuses_an_upload_without_a_file_name(fake, client):
    # What a client that forgot filename= would send: WeChat wants a file, not a field.
    body = encode_multipart({"media": "abc"}, {}, "b1")
    token = client.tokens.get_token()
    document = wxgate._http_json("POST", fake.url + MEDIA_UPLOAD_PATH,
                                 params={"access_token": token, "type": "image"}, body=body)
    assert document["errcode"] == 41005 and fake.uploads == []


@pytest.mark.parametrize("data, name, expected", [
    pytest.param(PNG, "poster", ("poster.png", "image/png"), id="png"),
    pytest.param(b"\xff\xd8\xff\xe0" + bytes(16), "tmpab12cd", ("tmpab12cd.jpg", "image/jpeg"),
                 id="jpeg"),
    pytest.param(b"GIF89a" + bytes(16), "anim", ("anim.gif", "image/gif"), id="gif"),
    pytest.param(b"#!AMR\n" + bytes(16), "voice", ("voice.amr", "audio/amr"), id="amr"),
    pytest.param(b"\x00\x00\x00\x18ftypmp42" + bytes(16), "clip", ("clip.mp4", "video/mp4"),
                 id="mp4"),
    # A name with an extension is the user's word; bytes we do not know add nothing.
    pytest.param(PNG, "poster.gif", ("poster.gif", "image/gif"), id="extension kept"),
    pytest.param(b"plain text", "notes", ("notes", "application/octet-stream"),
                 id="unknown bytes"),
    pytest.param(b"plain text", None, ("media.bin", "application/octet-stream"),
                 id="no name, unknown bytes"),
])
def test_a_name_without_an_extension_gets_the_one_of_its_bytes(data, name, expected):
    # WeChat types an upload by its file name's extension (40004 / 40113 for a bare name).
    # Media types are case-insensitive, and some systems' mime.types say audio/AMR.
    filename, content_type = wxgate._guess_media(data, name)
    assert (filename, content_type.lower()) == expected


def test_a_bare_path_is_uploaded_with_its_bytes_extension(fake, client, tmp_path):
    bare = tmp_path / "poster"
    bare.write_bytes(PNG)
    client.upload_temp_media(bare)
    assert [(u["filename"], u["content_type"]) for u in fake.uploads] == [
        ("poster.png", "image/png")]


# -- file names WeChat judges the type by, and FakeAPI's refusals ----------------------------


def uploaded_part(call):
    """The multipart part ``media`` of an upload FakeAPI recorded, parsed as a server would."""
    head = f"Content-Type: {call_content_type(call)}\r\n\r\n".encode("ascii")
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + call.data)
    parts = [part for part in parsed.iter_parts() if part.get_param(
        "name", header="content-disposition") == "media"]
    assert len(parts) == 1
    return parts[0]


def call_content_type(call):
    # FakeAPI keeps the body, not the headers: the boundary is the body's first line.
    boundary = call.data.split(b"\r\n", 1)[0][2:].decode("ascii")
    return f"multipart/form-data; boundary={boundary}"


def test_an_upload_named_without_an_extension_gets_the_extension_of_its_bytes(tmp_path):
    # WeChat judges an upload's type by its file name's extension (community reports: 40004 /
    # 40113 "unsupported file type" for a name without one). A PNG from a temporary file or a
    # path without a suffix must be sent with the .png its bytes say, not as "tmpab12cd".
    with wxgate.FakeAPI() as api:
        client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s", api_base=api.url))
        with tempfile.NamedTemporaryFile(dir=tmp_path) as file:
            file.write(PNG)
            file.flush()
            file.seek(0)
            client.upload_temp_media(file)
        bare = tmp_path / "poster"
        bare.write_bytes(PNG)
        client.upload_temp_media(bare)
        names = [uploaded_part(call).get_filename() for call in api.calls]
    assert [os.path.splitext(name)[1] for name in names] == [".png", ".png"], names


def test_fake_api_refuses_an_upload_without_a_media_file():
    # WeChat answers 41005 (media data missing) to an upload without the multipart field
    # `media`; were FakeAPI to hand out a media_id for any body, a user's test would pass with
    # an upload production refuses.
    with wxgate.FakeAPI() as api:
        client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s", api_base=api.url))
        for body in ({"media": "not a file"}, None):
            with pytest.raises(wxgate.WeChatAPIError):
                client.call("POST", "/cgi-bin/media/upload", params={"type": "image"},
                            json=body)


def test_fake_api_refuses_a_media_part_without_a_file_name():
    # What a client that forgot filename= would send: WeChat wants a file, not a field.
    with wxgate.FakeAPI() as api:
        client = wxgate.WeChatClient(wxgate.TokenManager(APPID, "s", api_base=api.url))
        body = wxgate._encode_multipart({"media": "abc"}, {}, "b1")
        with pytest.raises(wxgate.WeChatAPIError) as caught:
            client.call("POST", "/cgi-bin/media/upload", params={"type": "image"}, json=body)
        assert caught.value.errcode == 41005
        assert client.upload_temp_media(PNG).startswith("fake-media-")  # a real one passes
