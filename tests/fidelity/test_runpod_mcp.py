"""RunPod's own MCP server (``@runpod/mcp-server``, pinned by ``hack/nodeclients.sh``), unchanged,
driven over stdio JSON-RPC as an MCP client would (``initialize``,
``notifications/initialized``, ``tools/list``, ``tools/call``) against the simulator's REST v2:
the pod tools (create, get, list, update, action, delete), the endpoint tools (get, update,
list, set GPUs), the GPU catalogue, and how the client copes with the simulator's faults.

Version 4.0.0 takes its REST host from ``RUNPOD_API_BASE_URL`` (host only; it appends
``/v2/...``) and jobs from ``RUNPOD_SERVERLESS_API_URL``; ``RUNPOD_REST_V2_API_URL`` (with
``/v2``, what earlier versions read) is set too. Every base URL it knows points at the
simulator, and the process gets no environment beyond what is set here, so it talks to
nothing else (analytics only run with a ``POSTHOG_API_KEY``, never set)."""

import json
import os
import select
import subprocess
import time
from pathlib import Path

import pytest

from conftest import ENDPOINT, RUNPOD_KEY, eventually

GPU = "NVIDIA GeForce RTX 4090"


@pytest.fixture(scope="session")
def mcp_bin() -> str:
    home = os.environ.get("GPUPOOL_RUNPOD_MCP")
    binary = Path(home or "") / "node_modules" / ".bin" / "runpod-mcp"
    if not home or not binary.exists():
        pytest.fail("the RunPod MCP server is not installed (hack/fidelity.sh runs hack/nodeclients.sh)")
    return str(binary)


class Mcp:
    """A stdio MCP session with the server process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.next_id = 0

    def send(self, message: dict):
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def request(self, method: str, params: dict, timeout: float = 60.0) -> dict:
        self.next_id += 1
        rid = self.next_id
        self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to {method} in {timeout} s"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            assert line, f"the MCP server exited (code {self.proc.poll()})"
            msg = json.loads(line)
            if msg.get("id") == rid:
                assert "error" not in msg, msg
                return msg["result"]

    def call(self, tool: str, **arguments):
        """Calls a tool: (is_error, payload parsed from its one text content)."""
        result = self.request("tools/call", {"name": tool, "arguments": arguments})
        text = result["content"][0]["text"]
        return bool(result.get("isError")), json.loads(text)

    def ok(self, tool: str, **arguments):
        is_error, payload = self.call(tool, **arguments)
        assert not is_error, f"{tool}: {payload}"
        return payload


@pytest.fixture
def mcp(sim, mcp_bin, tmp_path):
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path),
        "NO_PROXY": "127.0.0.1,localhost",
        "RUNPOD_API_KEY": RUNPOD_KEY,
        "RUNPOD_API_BASE_URL": sim.url,
        "RUNPOD_REST_V2_API_URL": sim.url + "/v2",
        "RUNPOD_SERVERLESS_API_URL": sim.url + "/v2",
        "RUNPOD_PUBLIC_GRAPHQL_URL": sim.url + "/graphql",
        "RUNPOD_AUTHED_GRAPHQL_URL": sim.url + "/graphql",
    }
    proc = subprocess.Popen([mcp_bin], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, bufsize=1)
    session = Mcp(proc)
    init = session.request("initialize", {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "gpupool-fidelity", "version": "1"},
    })
    assert init["serverInfo"]["version"].startswith("4.0.0"), init["serverInfo"]
    session.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    yield session
    proc.stdin.close()
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def v2_calls(sim, operation):
    """Statuses of the simulator's logged calls of one operation, oldest first."""
    return [c["status"] for c in sim.admin("/admin/calls")["recent"] if c["operation"] == operation]


def test_the_tools_the_simulator_serves_are_listed(mcp):
    names = {t["name"] for t in mcp.request("tools/list", {})["tools"]}
    served = {"create-pod", "get-pod", "list-pods", "update-pod", "pod-action", "delete-pod",
              "list-gpu-types", "get-gpu-type", "list-endpoints", "get-endpoint", "update-endpoint",
              "set-endpoint-gpus"}
    assert served <= names, served - names


def test_pod_tools_create_get_list_update_stop_start_delete(mcp, sim):
    gpus = mcp.ok("list-gpu-types")["gpus"]
    assert {g["id"] for g in gpus} >= {GPU}
    one = mcp.ok("get-gpu-type", id=GPU, include=["AVAILABILITY"], product=["POD"])
    assert one["price"]["secure"] == 0.69 and one["availability"] == "HIGH"

    pod = mcp.ok("create-pod", body={
        "name": "mcp-pod", "image": "ghcr.io/gpupool/worker:1", "gpu": {"id": GPU, "count": 1},
        "ports": ["8000/http", "22/tcp"], "env": {"GPUPOOL_WORKER_PORT": "8000", "MARK": "mcp"},
    })
    pid = pod["id"]
    assert pod["status"] == "PROVISIONING" and pod["cost"] == 0.69
    running = eventually("running", lambda: (lambda p: p if p["status"] == "RUNNING" else None)(
        mcp.ok("get-pod", id=pid)))
    assert {p["private"] for p in running["runtime"]["ports"]} == {8000, 22}
    assert [p["id"] for p in mcp.ok("list-pods")["pods"]] == [pid]

    renamed = mcp.ok("update-pod", id=pid, body={"name": "mcp-renamed"})
    assert renamed["name"] == "mcp-renamed"
    stopped = mcp.ok("pod-action", id=pid, body={"action": "stop"})
    assert stopped["status"] == "EXITED" and stopped["cost"] == 0
    is_error, conflict = mcp.call("pod-action", id=pid, body={"action": "restart"})
    assert is_error and "EXITED" in json.dumps(conflict)
    assert mcp.ok("pod-action", id=pid, body={"action": "start"})["status"] == "STARTING"

    assert mcp.ok("delete-pod", id=pid) == {"status": 204}
    is_error, missing = mcp.call("get-pod", id=pid)
    assert is_error and f"pod {pid} not found" in json.dumps(missing)
    assert mcp.ok("list-pods")["pods"] == []
    # It reached the simulator's v2 surface and nothing else.
    ops = {c["operation"] for c in sim.admin("/admin/calls")["recent"]}
    assert all(o.startswith("runpod.v2.") for o in ops), ops


def test_endpoint_tools_get_update_list_and_set_gpus(mcp, sim):
    ep = mcp.ok("get-endpoint", id=ENDPOINT)
    assert ep["workers"] == {"min": 0, "max": 2, "idleTimeout": 2}
    assert ep["requestUrls"]["run"] == f"{sim.url}/v2/{ENDPOINT}/run"
    updated = mcp.ok("update-endpoint", id=ENDPOINT, body={"workers": {"max": 3, "idleTimeout": 10}})
    assert updated["workers"] == {"min": 0, "max": 3, "idleTimeout": 10}
    state = next(e for e in sim.admin("/admin/state")["endpoints"] if e["id"] == ENDPOINT)
    assert (state["workers_max"], state["idle_timeout"]) == (3, 10), "the same endpoint GraphQL saves"
    listed = mcp.ok("list-endpoints")
    assert [e["id"] for e in listed["items"]] == [ENDPOINT]
    gpus = mcp.ok("set-endpoint-gpus", endpointId=ENDPOINT, gpuIds="ADA_24,AMPERE_24,-NVIDIA GeForce RTX 3090")
    assert gpus["endpoint"]["gpuIds"] == "ADA_24,AMPERE_24,-NVIDIA GeForce RTX 3090"
    assert gpus["previousGpuIds"] == "ADA_24"
    is_error, refused = mcp.call("update-endpoint", id=ENDPOINT,
                                 body={"scaling": {"type": "REQUEST_COUNT", "requestCount": 2},
                                       "workers": {"idleTimeout": 5}})
    assert is_error and "idleTimeout" in json.dumps(refused)


def test_the_client_retries_429_after_retry_after_and_5xx_on_reads_but_not_creates(mcp, sim):
    pod = mcp.ok("create-pod", body={"name": "mcp-faults", "image": "i", "gpu": {"id": GPU, "count": 1}})
    pid = pod["id"]
    sim.admin_put("/admin/faults", {"rate_limits": {"runpod.v2.getPod": {"next": 1}},
                                    "errors": {"runpod.v2.listPods": {"next": 1, "status": 503},
                                               "runpod.v2.createPod": {"next": 1, "status": 503}}})
    started = time.monotonic()
    assert mcp.ok("get-pod", id=pid)["id"] == pid
    assert time.monotonic() - started >= 0.9, "it waited the Retry-After second"
    assert v2_calls(sim, "runpod.v2.getPod") == [429, 200]
    assert [p["id"] for p in mcp.ok("list-pods")["pods"]] == [pid]
    assert v2_calls(sim, "runpod.v2.listPods") == [503, 200]
    is_error, payload = mcp.call("create-pod", body={"name": "mcp-x", "image": "i", "gpu": {"id": GPU, "count": 1}})
    assert is_error and payload["status"] == 503
    assert v2_calls(sim, "runpod.v2.createPod") == [201, 503], "a create is never retried"
    # The contract and capacity errors come back with the simulator's detail.
    is_error, bad = mcp.call("create-pod", body={"name": "mcp-x", "image": "i", "gpu": {"id": GPU, "count": 1},
                                                 "interruptible": True})
    assert is_error and "additional properties 'interruptible' not allowed" in json.dumps(bad)
    is_error, none = mcp.call("create-pod", body={"name": "mcp-x", "image": "i", "gpu": {"id": GPU}})
    assert is_error and "no longer any instances available" in json.dumps(none)
