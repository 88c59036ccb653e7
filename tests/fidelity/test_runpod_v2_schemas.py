"""Every RunPod REST v2 answer the simulator gives in these flows validates against RunPod's
published OpenAPI 3.1 document (``runpod/rest-v2.openapi.json``), and so does every request
body the flows send that the simulator accepts.

Validation is strict: the document leaves most objects open (no ``additionalProperties:
false``), so a field the simulator invents or misspells would pass it unnoticed. Every object
schema of a response is closed here (``unevaluatedProperties: false`` on the outermost schema
of each ``allOf``, so composed schemas keep their members' properties), and
``test_strict_validation_catches_invented_and_misspelled_fields`` proves it bites.

Beyond the body: the status must be one the operation declares (or its ``default``), the
``Content-Type`` one of the declared media types, a 204 empty, and the declared headers
present and well-formed. For request bodies the simulator's verdict must agree with the
document's: it answers 422 exactly when the document rejects the body.

One deliberate extension: with ``limit``/``cursor`` the list answers carry ``pagination``
(later versions of the API; not in the August document), and only then is it allowed."""

import base64
import copy
import json
import re

import pytest
from openapi_schema_validator import OAS31Validator

from conftest import RUNPOD_KEY, eventually, specs_dir

GPU = "NVIDIA GeForce RTX 4090"
RATELIMIT = re.compile(r'^"minute";r=\d+;t=\d+, "hour";r=\d+;t=\d+, "day";r=\d+;t=\d+$')
POLICY = re.compile(r'^"minute";q=\d+;w=60, "hour";q=\d+;w=3600, "day";q=\d+;w=86400$')
PAGINATION = {
    "type": "object",
    "required": ["hasNextPage", "nextCursor"],
    "properties": {"hasNextPage": {"type": "boolean"}, "nextCursor": {"type": ["string", "null"]}},
}


@pytest.fixture(scope="module")
def doc():
    path = specs_dir() / "runpod" / "rest-v2.openapi.json"
    if not path.exists():
        pytest.fail(f"missing API document {path} (expected ../shared/api-specs next to the repo)")
    return json.loads(path.read_text())


def deref(node, root, depth=0):
    """Inlines local ``$ref``s (their sibling keywords are only descriptions here)."""
    assert depth < 60, "reference cycle"
    if isinstance(node, dict):
        if "$ref" in node:
            target = root
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return deref(target, root, depth + 1)
        return {k: deref(v, root, depth + 1) for k, v in node.items()}
    if isinstance(node, list):
        return [deref(v, root, depth + 1) for v in node]
    return node


def closed(schema, in_all_of=False):
    """A copy of ``schema`` with every object schema closed to unknown properties.

    A member of an ``allOf`` stays open (its siblings add properties); the schema holding the
    ``allOf`` is closed instead, and ``unevaluatedProperties`` sees what every member
    evaluated. Maps (``additionalProperties`` given) keep their own rule."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k == "allOf":
            out[k] = [closed(s, in_all_of=True) for s in v]
        elif k in ("anyOf", "oneOf", "prefixItems"):
            out[k] = [closed(s) for s in v]
        elif k in ("properties", "patternProperties", "$defs"):
            out[k] = {name: closed(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not", "if", "then", "else", "contains"):
            out[k] = closed(v)
        else:
            out[k] = v
    objectish = "properties" in schema or "allOf" in schema or schema.get("type") == "object"
    if (objectish and not in_all_of and "additionalProperties" not in schema
            and "unevaluatedProperties" not in schema):
        out["unevaluatedProperties"] = False
    return out


def errors_of(instance, schema):
    v = OAS31Validator(schema, format_checker=OAS31Validator.FORMAT_CHECKER)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in v.iter_errors(instance))


class V2:
    """Talks REST v2 to the simulator and checks every answer (and request) against the document."""

    def __init__(self, sim, doc):
        self.sim, self.doc = sim, doc
        self.seen = []  # (operationId, status) of every checked answer
        self.templates = []
        for template, item in doc["paths"].items():
            rx = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
            self.templates.append((re.compile(rx), template, item))
        # Static segments win, as on the server: /v2/pods/{id} before /v2/{x}/{y} shapes.
        self.templates.sort(key=lambda t: t[1].count("{"))

    def operation(self, method, path):
        bare = path.split("?")[0]
        for rx, template, item in self.templates:
            if rx.match(bare) and method.lower() in item:
                return template, item[method.lower()]
        raise AssertionError(f"{method} {bare} is no operation of the document")

    def __call__(self, method, path, body=None, key=RUNPOD_KEY, raw=None, headers=None, rule_422=False):
        """One request; ``rule_422`` marks a body the document accepts in shape but whose
        422 its prose documents (``workers.idleTimeout`` on a ``REQUEST_COUNT`` endpoint)."""
        _, op = self.operation(method, "/v2" + path)
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        kw = {"data": raw} if raw is not None else ({"json": body} if body is not None else {})
        r = self.sim.http.request(method, self.sim.url + "/v2" + path, headers=h, timeout=10, **kw)
        if body is not None and "requestBody" in op:
            self.check_request(op, body, r, rule_422)
        self.check_response(op, path, r)
        return r

    def check_request(self, op, body, r, rule_422):
        schema = deref(op["requestBody"]["content"]["application/json"]["schema"], self.doc)
        problems = errors_of(body, schema)
        if rule_422:
            assert r.status_code == 422 and not problems, (r.status_code, problems)
        elif r.status_code == 422:
            assert problems, f"the simulator refused a body the document accepts: {body}"
        elif r.status_code < 500 and r.status_code not in (401, 429):
            assert not problems, f"the simulator accepted a body the document refuses: {problems}"

    def check_response(self, op, path, r):
        status = str(r.status_code)
        responses = op["responses"]
        assert status in responses or "default" in responses, f"{op['operationId']}: undeclared {status}"
        resp = deref(responses.get(status, responses.get("default")), self.doc)
        self.seen.append((op["operationId"], r.status_code))
        for name, spec in resp.get("headers", {}).items():
            value = r.headers.get(name)
            if name == "Retry-After":
                if value is not None:
                    assert value.isdigit(), f"Retry-After {value!r}"
                continue
            if r.status_code == 401:
                continue
            assert value is not None, f"{op['operationId']} {status}: no {name} header"
            assert (RATELIMIT if name == "RateLimit" else POLICY).match(value), f"{name}: {value!r}"
        content = resp.get("content")
        if not content:
            assert r.content == b"", f"{op['operationId']} {status} has a body: {r.text[:200]}"
            return
        ctype = r.headers.get("Content-Type", "")
        assert ctype in content, f"{op['operationId']} {status}: Content-Type {ctype!r}, declared {list(content)}"
        schema = closed(content[ctype]["schema"])
        if "pagination" in r.json() and ("limit=" in path or "cursor=" in path):
            schema = copy.deepcopy(schema)
            schema["properties"]["pagination"] = closed(PAGINATION)
        problems = errors_of(r.json(), schema)
        assert not problems, f"{op['operationId']} {status}: {problems}\n{json.dumps(r.json())[:2000]}"


@pytest.fixture
def v2(sim, doc):
    return V2(sim, doc)


def pod_body(name, **extra):
    body = {"name": name, "image": "ghcr.io/gpupool/worker:1", "gpu": {"id": GPU, "count": 1},
            "ports": ["8000/http", "22/tcp"], "env": {"GPUPOOL_WORKER_PORT": "8000", "MARK": name},
            "disk": 20, "mounts": {"persistent": {"size": 20, "path": "/workspace"}}}
    body.update(extra)
    return body


def test_pod_life_cycle_answers_match_the_document(v2, sim):
    created = v2("POST", "/pods", pod_body("schema-life", cloud="SECURE", dataCenterIds=["US-TX-3"]))
    assert created.status_code == 201
    pid = created.json()["id"]
    seen = set()

    def status():
        s = v2("GET", f"/pods/{pid}").json()["status"]
        seen.add(s)
        return s == "RUNNING"

    eventually("running", status, interval=0.02)
    assert seen >= {"PROVISIONING", "RUNNING"}
    assert v2("GET", "/pods").json()["pods"][0]["id"] == pid
    v2("GET", "/pods?includeClusterPods=true&name=ignored")
    renamed = v2("PATCH", f"/pods/{pid}", {"name": "renamed", "env": {"A": "b"}, "locked": False})
    assert renamed.json()["name"] == "renamed"
    assert v2("POST", f"/pods/{pid}/action", {"action": "stop"}).json()["status"] == "EXITED"
    assert v2("POST", f"/pods/{pid}/action", {"action": "restart"}).status_code == 409
    assert v2("POST", f"/pods/{pid}/action", {"action": "start"}).json()["status"] == "STARTING"
    eventually("running again", lambda: v2("GET", f"/pods/{pid}").json()["status"] == "RUNNING")
    assert v2("POST", f"/pods/{pid}/action", {"action": "restart"}).status_code == 200
    sim.http.post(f"{sim.url}/admin/instances/{pid}/kill", timeout=10).raise_for_status()
    assert v2("GET", f"/pods/{pid}").json()["status"] == "ERROR"
    assert v2("POST", f"/pods/{pid}/action", {"action": "terminate"}).status_code == 204
    assert v2("GET", f"/pods/{pid}").status_code == 404
    assert v2("DELETE", f"/pods/{pid}").status_code == 404
    other = v2("POST", "/pods", pod_body("schema-delete")).json()["id"]
    assert v2("DELETE", f"/pods/{other}").status_code == 204
    assert {s for _, s in v2.seen} >= {200, 201, 204, 404, 409}


def test_paged_lists_and_pods_from_other_surfaces_match_the_document(v2, sim):
    for n in range(3):
        v2("POST", "/pods", pod_body(f"schema-page-{n}"))
    query = ('mutation { podFindAndDeployOnDemand(input: {name: "from-graphql", imageName: "img", '
             f'gpuTypeId: "{GPU}", gpuCount: 2, cloudType: COMMUNITY, ports: "8000/http,22/tcp", '
             'volumeInGb: 0}) { id } }')
    r = sim.http.post(sim.url + "/graphql", json={"query": query},
                      headers={"Authorization": f"Bearer {RUNPOD_KEY}"}, timeout=10)
    gql_id = r.json()["data"]["podFindAndDeployOnDemand"]["id"]
    rest = sim.rest("POST", "/pods", json={"name": "from-v1", "imageName": "img", "gpuTypeIds": [GPU]})
    assert rest.status_code == 201
    page = v2("GET", "/pods?limit=2").json()
    assert page["pagination"]["hasNextPage"] is True and len(page["pods"]) == 2
    rest_of = v2("GET", f"/pods?limit=10&cursor={page['pagination']['nextCursor']}").json()
    assert [p["name"] for p in rest_of["pods"]] == ["schema-page-2", "from-graphql", "from-v1"]
    assert rest_of["pagination"] == {"hasNextPage": False, "nextCursor": None}
    eventually("all running", lambda: all(p["status"] == "RUNNING" for p in v2("GET", "/pods").json()["pods"]))
    assert v2("GET", f"/pods/{gql_id}").json()["cloud"] == "COMMUNITY"
    assert v2("GET", "/pods?cursor=bogus").status_code == 400


def test_error_answers_match_the_document(v2, sim):
    assert v2("GET", "/pods", key="wrong").status_code == 401
    assert v2("GET", "/pods", key=None, headers={"Authorization": RUNPOD_KEY}).status_code == 401
    r = sim.http.get(f"{sim.url}/v2/pods?api_key={RUNPOD_KEY}", timeout=10)
    assert r.status_code == 401, "a query-string key must not authenticate"
    # The contract (422), every shape the simulator checks.
    assert v2("POST", "/pods", pod_body("x", bogus=1)).status_code == 422
    assert v2("POST", "/pods", pod_body("x", cloud="ALL")).status_code == 422
    assert v2("POST", "/pods", pod_body("x", gpu={"id": GPU, "count": 0})).status_code == 422
    assert v2("POST", "/pods", pod_body("x", gpu={"id": GPU, "count": 1, "minCudaVersion": "12"})).status_code == 422
    assert v2("POST", "/pods", pod_body("x", mounts={"persistent": {"size": 5, "path": "/w"}})).status_code == 422
    assert v2("POST", "/pods", {"name": "no-image", "gpu": {"id": GPU, "count": 1}}).status_code == 422
    assert v2("POST", "/pods", {"image": "i", "gpu": {"id": GPU, "count": 1}}).status_code == 422
    assert v2("POST", "/pods", pod_body("x", env={"A": 1})).status_code == 422
    # Rules and capacity (400), as RunPod tells them apart: by detail.
    no_count = v2("POST", "/pods", pod_body("x", gpu={"id": GPU}))
    assert no_count.status_code == 400 and "no longer any instances" in no_count.json()["detail"]
    assert v2("POST", "/pods", pod_body("x", dataCenterIds=["EU-SE-1"])).status_code == 400
    body = pod_body("x", cpu={"id": "cpu3c", "vcpuCount": 2})
    assert v2("POST", "/pods", body).status_code == 400
    assert v2("POST", "/pods", pod_body("x", templateId="tpl")).status_code == 404
    assert v2("POST", "/pods", raw="{nope", headers={"Content-Type": "application/json"}).status_code == 400
    assert v2("POST", "/pods/nope/action", {"action": "stop"}).status_code == 404
    assert v2("POST", "/pods/nope/action", {"action": "pause"}).status_code == 422
    assert v2("PATCH", "/pods/nope", {"name": "x"}).status_code == 404
    # Faults: 5xx (default response), 429 with and without Retry-After, ghost creates.
    sim.admin_put("/admin/faults", {
        "errors": {"runpod.v2.listPods": {"next": 1, "status": 503}},
        "rate_limits": {"runpod.v2.getPod": {"next": 1}, "runpod.v2.listGpuTypes": {"next": 1, "retry_after": 0}},
        "ghost_creates": {"runpod.v2.createPod": {"next": 1}},
    })
    assert v2("GET", "/pods").status_code == 503
    limited = v2("GET", "/pods/any")
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
    bare = v2("GET", "/catalog/gpus")
    assert bare.status_code == 429 and "Retry-After" not in bare.headers
    assert v2("POST", "/pods", pod_body("ghost")).status_code == 500
    assert [p["name"] for p in v2("GET", "/pods").json()["pods"]] == ["ghost"]
    sim.admin_put("/admin/faults", {"exhausted": [GPU]})
    assert v2("POST", "/pods", pod_body("none")).status_code == 400


def test_catalog_answers_match_the_document(v2):
    assert len(v2("GET", "/catalog/gpus").json()["gpus"]) == 3
    full = v2("GET", "/catalog/gpus?include=AVAILABILITY&product=POD&count=1&cloud=COMMUNITY").json()
    assert {g["availability"] for g in full["gpus"]} == {"HIGH"}
    v2("GET", "/catalog/gpus?include=AVAILABILITY&product=POD,SERVERLESS&countryCodes=RO")
    one = v2("GET", f"/catalog/gpus/{GPU}?include=AVAILABILITY&product=POD&cudaVersions=12.8").json()
    assert one["dataCenters"] and one["cudaVersions"] == [{"version": "12.8", "available": True}]
    assert v2("GET", f"/catalog/gpus/{GPU}?include=AVAILABILITY&product=POD&countryCodes=JP").json()["availability"] == "NONE"
    assert v2("GET", f"/catalog/gpus/{GPU}").json()["price"]["serverless"] == 1.1
    assert v2("GET", "/catalog/gpus/NVIDIA H100").status_code == 404
    assert v2("GET", "/catalog/gpus?include=AVAILABILITY").status_code == 400
    assert v2("GET", "/catalog/gpus?include=AVAILABILITY&product=POD&countryCodes=usa").status_code == 422


def test_endpoint_answers_match_the_document(v2):
    listed = v2("GET", "/serverless").json()["endpoints"]
    assert [e["id"] for e in listed] == ["fid-endpoint"]
    got = v2("GET", "/serverless/fid-endpoint").json()
    assert got["workers"] == {"min": 0, "max": 2, "idleTimeout": 2}
    patched = v2("PATCH", "/serverless/fid-endpoint", {
        "workers": {"max": 4, "idleTimeout": 30}, "name": "renamed", "timeout": 120000, "flashboot": "FLASHBOOT",
        "gpu": {"pools": ["ADA_24", "AMPERE_24"], "excludedTypes": ["NVIDIA GeForce RTX 3090"], "count": 1,
                "minCudaVersion": "12.1"},
        "env": {"MODEL": "x"}, "dataCenterIds": ["US-TX-3"],
    }).json()
    assert patched["workers"] == {"min": 0, "max": 4, "idleTimeout": 30}
    assert patched["gpu"]["excludedTypes"] == ["NVIDIA GeForce RTX 3090"]
    by_requests = v2("PATCH", "/serverless/fid-endpoint", {"scaling": {"type": "REQUEST_COUNT", "requestCount": 3}})
    assert "idleTimeout" not in by_requests.json()["workers"]
    assert v2("PATCH", "/serverless/fid-endpoint", {"workers": {"idleTimeout": 5}}, rule_422=True).status_code == 422
    assert v2("PATCH", "/serverless/fid-endpoint", {"workers": {"min": 9}}).status_code == 400
    assert v2("PATCH", "/serverless/fid-endpoint", {"scaling": {"type": "QUEUE_DELAY"}}).status_code == 422
    assert v2("PATCH", "/serverless/fid-endpoint", {"worker": {"min": 0}}).status_code == 422
    assert v2("PATCH", "/serverless/nope", {"name": "x"}).status_code == 404
    assert v2("GET", "/serverless/nope").status_code == 404


def test_strict_validation_catches_invented_and_misspelled_fields(v2, doc):
    """The checks above would pass a sloppy simulator if validation were lax: prove it is not."""
    pid = v2("POST", "/pods", pod_body("strict")).json()["id"]
    pod = eventually("running", lambda: (lambda p: p if p["status"] == "RUNNING" else None)(
        v2("GET", f"/pods/{pid}").json()))
    schema = closed(deref(doc["components"]["schemas"]["Pod"], doc))
    assert errors_of(pod, schema) == []
    invented = dict(pod, machine={"podHostId": "x"})
    assert errors_of(invented, schema), "an invented top-level field fails"
    misspelled = dict(pod)
    misspelled["dataCentreId"] = misspelled.pop("dataCenterId")
    assert errors_of(misspelled, schema), "a misspelled field fails"
    nested = copy.deepcopy(pod)
    nested["runtime"]["ports"][0]["publicPort"] = nested["runtime"]["ports"][0].pop("public")
    assert errors_of(nested, schema), "a misspelled nested field fails (inside anyOf/array)"
    gpu = copy.deepcopy(pod)
    gpu["gpu"]["displayName"] = "RTX 4090"
    assert errors_of(gpu, schema), "an invented field inside an allOf-wrapped object fails"
    bad_status = dict(pod, status="DEAD")
    assert errors_of(bad_status, schema), "a status outside the enum fails"
    problem = closed(deref(doc["components"]["schemas"]["ErrorResponse"], doc))
    assert errors_of({"title": "t", "status": 400, "detail": "d", "code": 1}, problem)


def test_cursors_are_opaque_but_stable(v2):
    ids = [v2("POST", "/pods", pod_body(f"cursor-{n}")).json()["id"] for n in range(3)]
    first = v2("GET", "/pods?limit=1").json()
    cursor = first["pagination"]["nextCursor"]
    assert base64.b64decode(cursor)  # opaque, but base64 like RunPod's own
    v2("DELETE", f"/pods/{ids[1]}")
    nxt = v2("GET", f"/pods?limit=1&cursor={cursor}").json()
    assert [p["id"] for p in nxt["pods"]] == [ids[2]]
