"""WeRoBot's WSGI app (``robot.wsgi``, a Bottle app), served by bench/http.py.

Safe mode (``encoding_aes_key`` and ``app_id`` set), session storage off (its default is a
SQLite file committed on every push), and a handler that answers nothing, like wxgate's no-op
handler, and logs one line per push, as wxgate does (WeRoBot itself logs none for a push it
answers). For a push its handlers leave unanswered WeRoBot logs "No handler responded message"
at WARNING; that line is an artefact of the no-op handler (a real one replies), so it is off.
"""

import logging

import werobot
from trivial_app import push_logger

# The bench app's secrets, as in bench/http.py.
TOKEN = "benchtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx2c2769f8efd9abc2"

robot = werobot.WeRoBot(token=TOKEN, encoding_aes_key=AES_KEY, app_id=APPID)
robot.config["SESSION_STORAGE"] = False
robot.logger.setLevel(logging.ERROR)
log = push_logger("werobot_app")


@robot.handler
def noop(message):
    log.info("push type=%s key=%s outcome=handled", message.type, message.message_id)
    return None


app = robot.wsgi
