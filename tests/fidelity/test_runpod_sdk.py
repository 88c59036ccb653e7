"""The unchanged official ``runpod`` SDK against the simulator: GPU types, create_pod,
get_pod(s), stop/resume, terminate_pod, and Serverless ``Endpoint.run/.status/.output``."""

import urllib.error
import urllib.request

import pytest

from conftest import ENDPOINT, RUNPOD_KEY, eventually

GPU = "NVIDIA GeForce RTX 4090"


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_gpu_types(runpod):
    ids = {g["id"] for g in runpod.get_gpus()}
    assert GPU in ids
    gpu = runpod.get_gpu(GPU, 2)
    assert gpu["securePrice"] == 0.69 and gpu["communityPrice"] == 0.34
    assert gpu["lowestPrice"]["uninterruptablePrice"] == 0.34
    with pytest.raises(ValueError):
        runpod.get_gpu("NVIDIA Imaginary 9000")


def test_create_get_stop_resume_terminate_pod(runpod, sim):
    pod = runpod.create_pod(
        "gpupool-fid-pod", "ghcr.io/gpupool/worker:1", GPU,
        cloud_type="SECURE", gpu_count=1, ports="8000/http,9000/tcp",
        env={"GPUPOOL_WORKER_PORT": "8000", "GPUPOOL_API_KEY": "pool-secret"},
    )
    pid = pod["id"]
    assert pod["imageName"] == "ghcr.io/gpupool/worker:1"
    assert "GPUPOOL_API_KEY=pool-secret" in pod["env"]
    assert pod["machine"]["podHostId"].startswith(pid)

    got = runpod.get_pod(pid)
    assert got["name"] == "gpupool-fid-pod" and got["desiredStatus"] == "RUNNING"
    assert got["costPerHr"] == 0.69
    running = eventually("runtime", lambda: (lambda p: p if p["runtime"] else None)(runpod.get_pod(pid)))
    ports = {p["privatePort"]: p for p in running["runtime"]["ports"]}
    assert ports[8000]["type"] == "http" and ports[8000]["isIpPublic"] is False
    assert ports[9000]["type"] == "tcp" and ports[9000]["ip"] == "127.0.0.1"
    # The http port answers through the proxy stand-in (503 until the worker has booted).
    eventually("worker healthy through the proxy", lambda: get(f"{sim.url}/proxy/{pid}-8000/health") == 200)
    assert [p["id"] for p in runpod.get_pods()] == [pid]

    assert runpod.stop_pod(pid)["desiredStatus"] == "EXITED"
    assert runpod.get_pod(pid)["runtime"] is None
    assert runpod.resume_pod(pid, 1)["desiredStatus"] == "RUNNING"
    eventually("runtime again", lambda: runpod.get_pod(pid)["runtime"])

    assert runpod.terminate_pod(pid) is None
    assert runpod.get_pod(pid) is None
    assert runpod.get_pods() == []
    line = next(i for i in sim.admin("/admin/bill")["instances"] if i["id"] == pid)
    assert line["alive"] is False and line["cost"] > 0


def test_create_pod_without_capacity_raises_query_error(runpod, sim):
    sim.admin_put("/admin/faults", {"exhausted": [GPU]})
    with pytest.raises(runpod.error.QueryError, match="no longer any instances available"):
        runpod.create_pod("gpupool-none", "img", GPU)


def test_bad_key_raises_authentication_error(runpod):
    with pytest.raises(runpod.error.AuthenticationError):
        runpod.get_pods(api_key="not-a-key")


def test_endpoint_run_status_output(runpod, sim):
    endpoint = runpod.Endpoint(ENDPOINT)
    job = endpoint.run({"operation": "transcode", "url": "s3://in.mp4", "simulate": {"seconds": 0.3}})
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS")
    out = job.output(timeout=30)
    assert out["operation"] == "transcode"
    assert out["result"]["input"] == {"operation": "transcode", "url": "s3://in.mp4"}
    assert job.status() == "COMPLETED"

    assert endpoint.run_sync({"operation": "thumb", "simulate": {"seconds": 0.1}}, timeout=30)["operation"] == "thumb"
    health = endpoint.health()
    assert health["jobs"]["completed"] == 2
    assert set(health["workers"]) >= {"idle", "running"}

    failed = endpoint.run({"simulate": {"status": 422, "error": "bad video", "seconds": 0}})
    eventually("failed", lambda: failed.status() == "FAILED")
    assert failed.output() is None

    slow = endpoint.run({"simulate": {"seconds": 30}})
    assert slow.cancel()["status"] == "CANCELLED"
    assert endpoint.purge_queue()["status"] == "completed"
    assert sim.admin("/admin/bill")["by_provider"]["serverless"] > 0


def test_endpoint_client_retries_429_over_http(runpod, sim):
    sim.admin_put("/admin/faults", {"rate_limits": {"serverless.status": {"next": 1}}})
    job = runpod.Endpoint(ENDPOINT).run({"simulate": {"seconds": 0}})
    # The SDK mounts its retry adapter (429 included) on http:// only: against the simulator
    # the 429 is retried transparently.
    assert job.status() in ("IN_QUEUE", "IN_PROGRESS", "COMPLETED")
    assert sim.admin("/admin/calls")["counts"]["serverless.status"]["429"] == 1


def test_endpoint_unknown_key(runpod):
    endpoint = runpod.Endpoint(ENDPOINT, api_key="wrong-" + RUNPOD_KEY)
    with pytest.raises(RuntimeError, match="401"):
        endpoint.run({"x": 1})
