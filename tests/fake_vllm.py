"""A stand-in for vLLM's OpenAI server in tests of the child-process handling (a scripted model double, real HTTP).

python fake_vllm.py --port P [--tokens 5,6,7] [--stop-token 3] [--record FILE] [--die-after N]
                    [--exit-at-start MESSAGE] [--never-healthy] [--grandchild]

Answers GET /health, GET /v1/models and POST /v1/completions (streamed: one scripted token id per event, as vLLM's
``return_token_ids``; not streamed: ``prompt_logprobs`` of -1.0 per token, rank 1). ``--record`` appends one JSON
line per event (its pid and its grandchild's at start, or its pid and command line when told to exit at start, each
request body, "cancelled" when a client went away).

:func:`install` makes it answer where finechat looks for vLLM (``$FINECHAT_VLLM_PYTHON`` running
``python -m vllm.entrypoints.openai.api_server --model FOLDER ...``), so ``finechat serve --engine vllm`` and
``finechat.load(..., engine="vllm")`` run their real start-up path against it. vLLM's own flags are accepted and
ignored; the script comes from ``FAKE_VLLM_*`` environment variables there (the child inherits finechat's
environment): ``FAKE_VLLM_ANSWERS`` (JSON ``{"word in the prompt": "answer text", "": "default answer"}``, encoded
with the model folder's tokenizer and ended by its end-of-text token), ``FAKE_VLLM_RECORD``,
``FAKE_VLLM_DIE_AFTER``, ``FAKE_VLLM_EXIT_AT_START``, ``FAKE_VLLM_DELAY``, ``FAKE_VLLM_MAX_LEN`` (the context it
reports, 64 by default).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SHIM = "import runpy, sys\nsys.argv[0] = {fake!r}\nrunpy.run_path({fake!r}, run_name='__main__')\n"


def install(folder: Path) -> str:
    """A ``python`` in ``folder`` whose ``-m vllm.entrypoints.openai.api_server`` is this fake; returns its path (for
    ``$FINECHAT_VLLM_PYTHON``)."""
    package = folder / "fakevllm" / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True, exist_ok=True)
    for level in (package, package.parent, package.parent.parent):
        (level / "__init__.py").touch()
    (package / "api_server.py").write_text(SHIM.format(fake=str(Path(__file__).resolve())))
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{folder / "fakevllm"}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return str(python)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tokens", default="5,6,7,8,9,10,11,12")
    parser.add_argument("--stop-token", type=int, default=None, help="end with finish_reason stop on this id")
    parser.add_argument("--record", default=None)
    parser.add_argument("--die-after", type=int, default=None, help="exit the process after N streamed tokens")
    parser.add_argument("--exit-at-start", default=None)
    parser.add_argument("--never-healthy", action="store_true")
    parser.add_argument("--grandchild", action="store_true", help="start a long sleep child (vLLM's engine core)")
    parser.add_argument("--delay", type=float, default=float(os.environ.get("FAKE_VLLM_DELAY", 0.05)))
    parser.add_argument("--model", default=None, help="vLLM's: the folder whose tokenizer encodes FAKE_VLLM_ANSWERS")
    args, _vllm_flags = parser.parse_known_args()  # vLLM's other flags (--dtype, --lora-modules, ...) are ignored
    env = os.environ.get
    args.record = args.record or env("FAKE_VLLM_RECORD")
    args.exit_at_start = args.exit_at_start or env("FAKE_VLLM_EXIT_AT_START")
    if args.die_after is None and env("FAKE_VLLM_DIE_AFTER"):
        args.die_after = int(env("FAKE_VLLM_DIE_AFTER"))
    answers = json.loads(env("FAKE_VLLM_ANSWERS", "{}"))
    max_len = int(env("FAKE_VLLM_MAX_LEN", "64"))
    tokenizer = None
    if answers:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        args.stop_token = tokenizer.eos_token_id

    def record(**event) -> None:
        if args.record:
            with open(args.record, "a") as fh:
                fh.write(json.dumps(event) + "\n")

    if args.exit_at_start:
        record(pid=os.getpid(), argv=sys.argv[1:], exited=True)
        print("INFO starting fake vLLM", flush=True)
        print(args.exit_at_start, flush=True)
        sys.exit(1)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) if args.grandchild else None
    record(pid=os.getpid(), grandchild=grandchild.pid if grandchild else None)
    tokens = [int(t) for t in args.tokens.split(",") if t]

    def scripted(prompt: list[int]) -> list[int]:
        """The answer's token ids: the first answer whose key is in the prompt (FAKE_VLLM_ANSWERS), else --tokens."""
        if tokenizer is None:
            return tokens
        text = tokenizer.decode(prompt)
        answer = next((a for key, a in answers.items() if key and key in text), answers.get("", ""))
        return tokenizer.encode(answer, add_special_tokens=False)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a) -> None:  # quiet
            pass

        def reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                if args.never_healthy:
                    self.reply(503, {"error": "not ready"})
                else:
                    self.reply(200, {})
            elif self.path == "/v1/models":
                self.reply(200, {"data": [{"id": "finechat", "max_model_len": max_len}]})
            else:
                self.reply(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            record(request=body)
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            if len(prompts[0]) > max_len - 4:
                self.reply(400, {"error": {"message": f"This model's maximum context length is {max_len} tokens.",
                                           "type": "BadRequestError", "code": 400}})
                return
            if not body.get("stream"):
                choices = [{"index": i, "text": "", "prompt_logprobs": [None] + [
                    {str(t): {"logprob": -1.0, "rank": 1, "decoded_token": "x"}} for t in p[1:]]}
                           for i, p in enumerate(prompts)]
                self.reply(200, {"choices": choices})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            full = scripted(prompts[0])
            out = full[:body["max_tokens"]]
            ends = "stop" if args.stop_token is not None and len(out) == len(full) else "length"
            try:
                for n, token in enumerate(out, 1):
                    if args.die_after is not None and n > args.die_after:
                        os._exit(3)
                    last = n == len(out)
                    finish = ends if last else None
                    choice = {"index": 0, "text": "", "token_ids": [token], "finish_reason": finish,
                              "stop_reason": args.stop_token if finish == "stop" else None}
                    self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
                    time.sleep(args.delay)
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                record(cancelled=True)

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
