"""Typed code using wxgate's public names, for mypy only (tests/test_types.py): never run.

Each line states what a user's editor and type checker should see. A public annotation that
is wrong (a return type, a parameter, an attribute) makes mypy report an error here.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import wxgate

router = wxgate.Router()


@router.message("text", "image")
def on_text(message: wxgate.Message) -> dict[str, Any] | None:
    kind: str | None = message.msg_type
    sender: str = message.from_user
    event: str | None = message.event
    app: str = message.app
    encrypted: bool = message.encrypted
    content: Any = message["Content"]
    items: list[dict[str, Any]] = message.items_list
    plain: dict[str, Any] = message.to_dict()
    print(kind, event, app, encrypted, content, items, plain, len(message), list(message))
    client: wxgate.WeChatClient = message.client
    if sender:
        answer: dict[str, Any] = client.send_text(sender, "收到")
        media_id: str = client.upload_temp_media(b"\x89PNG\r\n\x1a\n")
        media_id = client.upload_temp_media(Path("poster.png"), filename="p.png")
        media_id = client.upload_temp_media(io.BytesIO(b""), content_type="image/png")
        client.send_image(sender, media_id)
        client.send_link(sender, "title", "description", "https://example.com", "https://t")
        client.send_miniprogrampage(sender, "title", "pages/index", media_id)
        client.send_subscribe_message(sender, "T1", {"thing1": "shipped"}, page="index")
        client.set_typing(sender, False)
        client.call("POST", "/wxa/anything", params={"a": "b"}, json={"c": 1})
        token: str = client.tokens.get_token()
        print(answer, token)
    return {"MsgType": "transfer_customer_service"}


# The decorators hand the function back with its own type.
same: dict[str, Any] | None = on_text(wxgate.Message({"MsgType": "text"}))


@router.event("user_enter_tempsession")
def on_enter(message: wxgate.Message) -> str:
    return ""


@router.default
def other(message: wxgate.Message) -> None:
    return None


def build() -> None:
    config: wxgate.Config = wxgate.load_config("wxgate.ini", environ={"WX_TOKEN": "abc"})
    config = wxgate.load_config(Path("wxgate.ini"))
    shop: wxgate.AppConfig = config.apps["shop"]
    key: bytes | None = shop.aes_key
    gateway: wxgate.Gateway = wxgate.make_app(config)
    gateway = wxgate.make_app("wxgate.ini", clock=lambda: 0.0)
    client: wxgate.WeChatClient = gateway.client("shop")
    body: list[bytes] = gateway({"REQUEST_METHOD": "GET"}, lambda status, headers: None)
    gateway.close()

    wechat = wxgate.Simulator(config, "shop", clock=lambda: 1.0, random_bytes=bytes)
    push = wechat.push({"MsgType": "text", "Content": "hi"}, format="json")
    url: str = push.url
    data: bytes = push.body
    headers: dict[str, str] = push.headers
    reply: dict[str, Any] | str = wechat.open_reply(data)
    reply_type: str = wechat.open_reply(data)["MsgType"]  # Any: the test indexes what it expects
    check = wechat.handshake(token="ConsoleToken")
    expected: bytes = check.expected

    with wxgate.FakeAPI() as api:
        faked: wxgate.Config = api.configure(config)
        api.answer("/cgi-bin/message/custom/send", {"errcode": 45015})
        sent: list[Any] = api.sent
        base: str = api.url

    store: wxgate.Store = wxgate.open_store("memory")
    store = wxgate.MemoryStore(100, clock=lambda: 0.0)
    store = wxgate.SqliteStore("/tmp/x.db", busy_timeout=1.0)
    added: bool = store.add("k", "v", 1.5)
    value: str | None = store.get("k")
    tokens = wxgate.TokenManager("wx1", "secret", store=store, clock=lambda: 0.0)
    fresh: str = tokens.get_token()
    tokens.invalidate_token(fresh)
    client = wxgate.WeChatClient(tokens)

    signature: str = wxgate.sign("token", 1700000000, "nonce")
    wxgate.check_signature(signature, "token", "1700000000", "nonce")
    encrypt: str = wxgate.encrypt_message("<xml/>", "A" * 43, "wx1", random_prefix=b"0" * 16)
    text: str = wxgate.decrypt_message(encrypt, "A" * 43, "wx1")
    code: int = wxgate.main(["check", "wxgate.ini"])
    print(key, client, body, url, headers, reply, reply_type, expected, faked, sent, base,
          added, value, text, code)


def errors() -> None:
    try:
        build()
    except wxgate.WeChatAPIError as exc:
        errcode: int = exc.errcode
        errmsg: str = exc.errmsg
        print(errcode, errmsg)
    except wxgate.ConfigError as exc:
        where: str | None = exc.section
        line: int | None = exc.lineno
        print(where, line)
    except wxgate.WxgateError as exc:
        status: int = exc.status
        wechat_code: int | None = exc.code
        message: str = exc.message
        print(status, wechat_code, message)
    raise wxgate.MessageError("body is not a push", code=None)
