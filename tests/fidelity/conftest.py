"""Fixtures for the fidelity tests: the simulator binary, the official clients pointed at it.

The simulator runs once per session (``tests/fidelity/sim-config.yaml``) and is reset through
its admin API before every test. The ``vastai`` CLI runs as a subprocess from the venv that
``hack/pyclients.sh`` built; the ``runpod`` SDK is imported only after its base-URL
environment variables point at the simulator, because it reads them at import time.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
VAST_KEY = "vast-fidelity-key"
RUNPOD_KEY = "runpod-fidelity-key"
ENDPOINT = "fid-endpoint"

# Never let a developer's proxy settings route loopback traffic elsewhere.
os.environ["NO_PROXY"] = "127.0.0.1,localhost"
os.environ["no_proxy"] = "127.0.0.1,localhost"


def _sim_binary() -> Path:
    explicit = os.environ.get("GPUPOOL_SIM_BIN")
    if explicit:
        return Path(explicit)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    subprocess.run(["cargo", "build", "--bin", "gpupool-sim"], cwd=REPO, check=True)
    return target / "debug" / "gpupool-sim"


def specs_dir() -> Path:
    """The providers' published API documents, laid out next to the repository as in CI."""
    return Path(os.environ.get("GPUPOOL_API_SPECS", REPO / ".." / "shared" / "api-specs")).resolve()


class Sim:
    """A running ``gpupool-sim`` process and small helpers around its HTTP APIs."""

    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc = proc
        self.url = url
        self.http = requests.Session()
        self.http.trust_env = False

    def admin(self, path: str):
        r = self.http.get(self.url + path, timeout=10)
        r.raise_for_status()
        return r.json()

    def admin_put(self, path: str, body):
        r = self.http.put(self.url + path, json=body, timeout=10)
        r.raise_for_status()
        return r.json()

    def reset(self):
        self.http.post(self.url + "/admin/reset", timeout=10).raise_for_status()

    def vast(self, method: str, path: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers.setdefault("Authorization", f"Bearer {VAST_KEY}")
        return self.http.request(method, self.url + path, headers=headers, timeout=10, **kw)

    def rest(self, method: str, path: str, **kw) -> requests.Response:
        headers = kw.pop("headers", {})
        headers.setdefault("Authorization", f"Bearer {RUNPOD_KEY}")
        return self.http.request(method, self.url + "/v1" + path, headers=headers, timeout=10, **kw)


def eventually(what, fn, timeout=15.0, interval=0.05):
    """Polls ``fn`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def sim():
    binary = _sim_binary()
    proc = subprocess.Popen(
        [str(binary), "--config", str(HERE / "sim-config.yaml")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline().strip()
    prefix = "gpupool-sim listening on "
    if not line.startswith(prefix):
        proc.kill()
        raise RuntimeError(f"gpupool-sim did not start: {line!r}")
    s = Sim(proc, line[len(prefix):])
    yield s
    # Stop it the way an operator would: SIGTERM to the pid we started.
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, f"gpupool-sim exited with {proc.returncode}"


@pytest.fixture(autouse=True)
def _fresh_world(sim):
    sim.reset()
    yield


@pytest.fixture(scope="session")
def vastai_bin() -> str:
    explicit = os.environ.get("GPUPOOL_VASTAI_BIN")
    candidates = [explicit, str(Path(sys.executable).parent / "vastai"), shutil.which("vastai")]
    for c in candidates:
        if c and Path(c).exists():
            return c
    pytest.fail("the vastai CLI is not installed (run hack/pyclients.sh)")


@pytest.fixture
def vastai(sim, vastai_bin, tmp_path):
    """Runs the unchanged ``vastai`` CLI against the simulator; returns (rc, stdout, stderr)."""

    def run(*args, api_key=VAST_KEY, use_env_url=True, raw_json=False):
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),  # no key files or update-check state from the real home
            "XDG_CONFIG_HOME": str(tmp_path / "config"),
            "XDG_CACHE_HOME": str(tmp_path / "cache"),
            "VASTAI_NO_UPDATE_CHECK": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "COLUMNS": "200",
        }
        argv = [vastai_bin]
        if use_env_url:
            env["VAST_URL"] = sim.url
        else:
            argv += ["--url", sim.url]
        argv += list(args)
        if api_key is not None:
            argv += ["--api-key", api_key]
        p = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        if raw_json:
            assert p.returncode == 0, p.stderr + p.stdout
            return json.loads(p.stdout)
        return p.returncode, p.stdout, p.stderr

    return run


@pytest.fixture(scope="session")
def runpod(sim):
    """The official ``runpod`` SDK, configured for the simulator through its own settings."""
    os.environ["RUNPOD_API_BASE_URL"] = sim.url
    os.environ["RUNPOD_ENDPOINT_BASE_URL"] = sim.url + "/v2"
    import runpod as sdk  # noqa: PLC0415 - must follow the environment above

    assert sdk.endpoint_url_base == sim.url + "/v2"
    sdk.api_key = RUNPOD_KEY
    return sdk
