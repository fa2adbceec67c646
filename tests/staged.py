"""Issue 12's names, from wxgate once merged, from staging/issue12.py until then.

TODO(issue 12 merge): once wxgate.py holds Router, Simulator and the rest, this file keeps
working unchanged (every name comes from wxgate); delete the staging fallback with staging/.
"""

import wxgate

MERGED = hasattr(wxgate, "Router")
if MERGED:
    _home = wxgate
else:  # pragma: no cover - only before the merge
    import staging.issue12 as _home

Router = _home.Router
Simulator = _home.Simulator
FakeAPI = _home.FakeAPI
demo_handler = _home.demo_handler
encode_multipart = _home._encode_multipart
push_command = _home._push
handshake_command = _home._handshake_command
# A method once merged; until then a function taking the client first, called the same way.
upload_temp_media = wxgate.WeChatClient.upload_temp_media if MERGED else \
    _home.upload_temp_media
# What an ini names to use the new demo handler.
DEMO_HANDLER_SPEC = "wxgate:demo_handler" if MERGED else "staging.issue12:demo_handler"
