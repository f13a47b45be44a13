"""seedfork's guard in vLLM's own API server stack: requests are refused until the agent verified the weights.

Runs in vLLM's environment: vLLM's own ``serve`` parser reads the ``--middleware`` the operator renders,
and vLLM's own ``init_entrypoints_middleware`` installs it on a FastAPI app, as ``vllm serve`` does.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.vllm

_SCRIPT = r"""
import http.server, json, os, sys, threading, time
from fastapi import FastAPI
from fastapi.testclient import TestClient
from vllm.entrypoints.cli.serve import ServeSubcommand
from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware
from vllm.utils.argparse_utils import FlexibleArgumentParser

state = {"state": "standby"}

class Agent(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(state).encode()
        self.send_response(200 if self.path == "/v1/progress" else 404)
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

agent = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Agent)
threading.Thread(target=agent.serve_forever, daemon=True).start()
os.environ["SEEDFORK_POD_IP"], os.environ["SEEDFORK_AGENT_PORT"] = "127.0.0.1", str(agent.server_port)

parser = ServeSubcommand().subparser_init(FlexibleArgumentParser().add_subparsers())
args = parser.parse_args(json.loads(sys.argv[1]))
app = FastAPI()
app.post("/v1/completions")(lambda: {"ok": True})
app.get("/health")(lambda: {})
init_entrypoints_middleware(args, app, ())
seen = []
with TestClient(app) as client:
    seen += [client.post("/v1/completions").status_code, client.get("/health").status_code]
    state["state"] = "verified"
    time.sleep(0.3)  # the guard re-reads an agent that said "not verified" after 0.25 s
    seen.append(client.post("/v1/completions").status_code)
    state["state"] = "transferring"  # a new attempt: the pod's weights are in question again
    time.sleep(2.2)
    seen.append(client.post("/v1/completions").status_code)
    agent.shutdown(); agent.server_close()  # an agent that does not answer: refused
    time.sleep(2.2)
    seen.append(client.post("/v1/completions").status_code)
print(json.dumps({"middleware": args.middleware, "seen": seen}))
"""


def test_vllm_refuses_requests_until_the_agent_verified_the_weights():
    from seedfork_localdev import vllm
    from seedfork_operator.render import VLLM_GUARD, vllm_engine

    engine = vllm_engine({"name": "engine", "image": "v", "args": ["/models/m", "--load-format", "dummy"]}, 8000)
    got = vllm.run_script(_SCRIPT, json.dumps(engine["args"]))  # a missing vLLM environment fails, never skips
    assert got["middleware"] == [VLLM_GUARD]
    assert got["seen"] == [503, 200, 200, 503, 503]
