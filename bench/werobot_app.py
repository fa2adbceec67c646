"""WeRoBot's WSGI app (``robot.wsgi``, a Bottle app), served by bench/http.py.

Safe mode (``encoding_aes_key`` and ``app_id`` set), session storage off (its default is a
SQLite file committed on every push), and a handler that answers nothing, like wxgate's no-op
handler. For a push its handlers leave unanswered WeRoBot logs "No handler responded message"
at WARNING; that line is an artefact of the no-op handler (a real one replies), so it is off
here, as in bench/pipeline.py's main WeRoBot row.
"""

import logging

import werobot

# The bench app's secrets, as in bench/http.py.
TOKEN = "benchtoken123"
AES_KEY = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG"
APPID = "wx2c2769f8efd9abc2"

robot = werobot.WeRoBot(token=TOKEN, encoding_aes_key=AES_KEY, app_id=APPID)
robot.config["SESSION_STORAGE"] = False
robot.logger.setLevel(logging.ERROR)


@robot.handler
def noop(message):
    return None


app = robot.wsgi
