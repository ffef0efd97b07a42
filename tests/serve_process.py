"""``python tests/serve_process.py PORT``: a slow scripted model served the way ``finechat serve`` serves, in a
process of its own, for tests that send it signals."""

import sys

from serve_helpers import ScriptedChat
from tiny import make_tokenizer

from finechat.serve.api import create_app
from finechat.serve.server import ConnectionLimits, serve

if __name__ == "__main__":
    bot = ScriptedChat(make_tokenizer(), "one two three four " * 100, delay=0.05)
    serve(create_app(bot), "127.0.0.1", int(sys.argv[1]), ConnectionLimits(shutdown_timeout=3))
