"""The unchanged official ``vastai`` CLI against the simulator: search offers, create,
show instance(s), label, destroy, errors and retries."""

import urllib.error
import urllib.request

from conftest import eventually


def worker_health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_search_offers_raw_and_table(vastai):
    offers = vastai("search", "offers", "gpu_name=RTX_4090 num_gpus=1", "-o", "dph_total", "--raw", raw_json=True)
    assert [o["id"] for o in offers] == [1002, 1001]
    assert all(o["gpu_name"] == "RTX 4090" and o["num_gpus"] == 1 for o in offers)
    # The CLI refuses the answer unless Content-Type is exactly application/json.
    rc, out, err = vastai("search", "offers", "num_gpus>=2 dph<1", "-o", "dph-")
    assert rc == 0, err
    assert "invalid return Content-Type" not in out
    assert "RTX_4090" in out and "RTX_3060" in out
    rows = vastai("search", "offers", "reliability>0.99 geolocation in [US,CA]", "--new", "--raw", raw_json=True)
    assert sorted(o["id"] for o in rows) == [1001, 1005]


def test_create_show_label_destroy(vastai, sim):
    created = vastai(
        "create", "instance", "1001", "--image", "ghcr.io/gpupool/worker:1", "--disk", "16",
        "--env", "-p 8000:8000 -e GPUPOOL_WORKER_PORT=8000 -e GPUPOOL_API_KEY=pool-secret",
        "--label", "gpupool-fid-1", "--onstart-cmd", "serve", "--raw", raw_json=True,
    )
    assert created["success"] is True
    iid = created["new_contract"]
    assert isinstance(iid, int) and created["instance_api_key"]

    row = eventually(
        "running",
        lambda: (lambda r: r if r.get("actual_status") == "running" else None)(
            vastai("show", "instance", str(iid), "--raw", raw_json=True)
        ),
    )
    assert row["label"] == "gpupool-fid-1"
    assert row["extra_env"]["GPUPOOL_API_KEY"] == "pool-secret"  # the CLI turns pairs into a dict
    assert row["disk_space"] == 16
    port = int(row["ports"]["8000/tcp"][0]["HostPort"])
    eventually("worker healthy", lambda: worker_health(port) == 200)

    rc, out, err = vastai("show", "instance", str(iid))
    assert rc == 0 and str(iid) in out, err
    rc, out, err = vastai("label", "instance", str(iid), "gpupool-fid-relabeled")
    assert rc == 0 and "set to gpupool-fid-relabeled" in out, err + out
    rows = vastai("show", "instances", "--raw", raw_json=True)
    assert [(r["id"], r["label"]) for r in rows] == [(iid, "gpupool-fid-relabeled")]
    rc, out, _ = vastai("show", "instances", "--label", "gpupool-fid-relabeled", "-q")
    assert out.split() == [str(iid)]
    rc, out, _ = vastai("show", "instances", "--label", "someone-else", "-q")
    assert out.split() == []
    rc, out, err = vastai("show", "instances")
    assert rc == 0 and "gpupool-fid-relabeled" in out, err

    rc, out, err = vastai("destroy", "instance", str(iid), "-y")
    assert rc == 0 and f"destroying instance {iid}" in out, err + out
    rc, out, err = vastai("show", "instance", str(iid))
    assert rc == 1 and "not found or no longer exists" in err
    assert vastai("show", "instance", str(iid), "--raw", raw_json=True) == {"instances": None}
    rc, out, err = vastai("destroy", "instance", str(iid), "-y")
    assert "Instance not found" in out + err
    bill = sim.admin("/admin/bill")
    assert bill["instances"][0]["alive"] is False and bill["instances"][0]["cost"] > 0


def test_show_instances_pages_through_many_instances(vastai, sim):
    sim.admin_put("/admin/catalogue", {"vast_offers": [{"id": 9, "gpu_name": "RTX 3060", "dph_total": 0.1, "capacity": 40}]})
    # Set up over plain HTTP (27 CLI start-ups would only slow the test down).
    ids = [
        sim.vast("PUT", "/api/v0/asks/9/", json={"image": "img", "label": f"gpupool-page-{n}"}).json()["new_contract"]
        for n in range(27)
    ]
    rows = vastai("show", "instances", "--raw", raw_json=True)
    assert [r["id"] for r in rows] == ids  # two pages of 25 + 2, joined by the CLI
    rc, out, _ = vastai("show", "instances", "-q")
    assert [int(x) for x in out.split()] == ids


def test_url_flag_and_environment_key(vastai, sim):
    offers = vastai("--raw", "search", "offers", "gpu_name=RTX_3060", use_env_url=False, raw_json=True)
    assert {o["id"] for o in offers} == {1003, 1004}


def test_bad_key_is_reported_as_invalid_user_key(vastai):
    rc, out, err = vastai("show", "instances", api_key="not-a-key")
    assert "Invalid user key" in out + err


def test_cli_retries_429_without_retry_after(vastai, sim):
    sim.admin_put("/admin/faults", {"rate_limits": {"vast.show": {"next": 2}}})
    assert vastai("show", "instance", "123", "--raw", raw_json=True) == {"instances": None}
    counts = sim.admin("/admin/calls")["counts"]["vast.show"]
    assert counts == {"429": 2, "200": 1}


def test_create_on_exhausted_capacity_fails(vastai, sim):
    sim.admin_put("/admin/faults", {"exhausted": ["RTX 4090"]})
    assert vastai("search", "offers", "gpu_name=RTX_4090", "--raw", raw_json=True) == []
    rc, out, err = vastai("create", "instance", "1001", "--image", "img")
    assert rc != 0 or "no_such_ask" in out + err
    assert "no_such_ask" in out + err
    assert sim.admin("/admin/state")["instances"] == []
