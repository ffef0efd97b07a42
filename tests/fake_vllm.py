"""A stand-in for vLLM's OpenAI server in tests of the child-process handling (a scripted model double, real HTTP).

python fake_vllm.py --port P [--tokens 5,6,7] [--stop-token 3] [--record FILE] [--die-after N]
                    [--exit-at-start MESSAGE] [--never-healthy] [--grandchild]

Answers GET /health, GET /v1/models and POST /v1/completions (streamed: one scripted token id per event, as vLLM's
``return_token_ids``; not streamed: ``prompt_logprobs`` of -1.0 per token, rank 1). ``--record`` appends one JSON
line per event (its pid and its grandchild's at start, each request body, "cancelled" when a client went away).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    parser.add_argument("--delay", type=float, default=0.05)
    args = parser.parse_args()

    def record(**event) -> None:
        if args.record:
            with open(args.record, "a") as fh:
                fh.write(json.dumps(event) + "\n")

    if args.exit_at_start:
        print("INFO starting fake vLLM", flush=True)
        print(args.exit_at_start, flush=True)
        sys.exit(1)
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) if args.grandchild else None
    record(pid=os.getpid(), grandchild=grandchild.pid if grandchild else None)
    tokens = [int(t) for t in args.tokens.split(",") if t]

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
                self.reply(200, {"data": [{"id": "finechat", "max_model_len": 64}]})
            else:
                self.reply(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            record(request=body)
            prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
            if len(prompts[0]) > 60:
                self.reply(400, {"error": {"message": "This model's maximum context length is 64 tokens.",
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
            out = tokens[:body["max_tokens"]]
            try:
                for n, token in enumerate(out, 1):
                    if args.die_after is not None and n > args.die_after:
                        os._exit(3)
                    last = n == len(out)
                    finish = ("stop" if args.stop_token is not None else "length") if last else None
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
