"""Review of issue 11 (cloud mode, rotation, RawReply): problems found, as failing tests."""

import pytest

from conftest import Recorder, text_message
from test_cloud import HEADERS, make_cloud, push  # noqa: F401 (fixture)


def test_empty_x_wx_source_is_refused_like_a_missing_one(make_cloud):
    # Issue 11: "a request without X-WX-SOURCE is refused". A present-but-empty header
    # carries no source at all; today `name in environ` lets it through to the handler.
    handler = Recorder()
    _, testapp = make_cloud(handler)
    headers = dict(HEADERS, **{"X-WX-SOURCE": ""})
    push(testapp, text_message(msg_id="empty-source"), headers=headers, status=403)
    assert handler.calls == 0


@pytest.mark.parametrize("fmt", ["json", "xml"])
def test_a_push_carrying_an_action_field_is_not_swallowed_as_the_path_check(make_cloud, fmt):
    # The console's probe is exactly {"action":"CheckContainerPath"}. A real message that
    # also has MsgType/MsgId (or any extra field) is answered success and never handled,
    # nor deduplicated: the path check should match the probe's shape, not one field.
    handler = Recorder()
    _, testapp = make_cloud(handler)
    fields = dict(text_message(msg_id="77"), action="CheckContainerPath")
    push(testapp, fields, fmt)
    assert handler.calls == 1
