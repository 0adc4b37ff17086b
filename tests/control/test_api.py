"""The daemon's REST API route by route: a real daemon, real HTTP, real model-server processes.

Every route is called over the wire (httpx, no client library of ours in
between) and its answer checked against what really runs: inference through
the endpoint it reports, log lines the replicas printed, events the
reconciler wrote. The route table and the OpenAPI document are held to the
same set of paths and methods.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from control_helpers import SERVICE, LiveDaemon, service_yaml, until

from uniframe.build.examples import write_iris
from uniframe.control.api.logs import tail
from uniframe.control.api.openapi import OPENAPI
from uniframe.control.api.routes import ROUTES
from uniframe.control.api.server import MAX_BODY
from uniframe.runtime.registry import driver_for

IRIS_ROW = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                        "data": [5.1, 3.5, 1.4, 0.2]}]}


@pytest.fixture
def iris(tmp_path: Path) -> Path:
    """The model under the test's own directory, which the test daemon lets specs name."""
    return write_iris(tmp_path / "iris")


@pytest.fixture
def http(live: LiveDaemon) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30, headers=live.headers) as client:
        yield client



def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()


def apply(http: httpx.Client, text: str, **params: Any) -> dict[str, Any]:
    result: dict[str, Any] = ok(http.post("/v1/apply", content=text, params=params))
    return result


def settled(http: httpx.Client, name: str = "iris") -> Callable[[], dict[str, Any] | None]:
    """A check: the object once its rollout is complete with every replica ready."""
    def check() -> dict[str, Any] | None:
        obj: dict[str, Any] = ok(http.get(f"/v1/objects/{SERVICE}/{name}"))
        rollout = obj["status"]["rollout"]
        counts = obj["status"]["replicas"]
        done = (rollout["state"] == "complete"
                and rollout["target_digest"] == obj["status"]["revision_digest"]
                and counts["ready"] == counts["total"] == counts["desired"])
        return obj if done else None
    return check


def infer(port: int) -> dict[str, Any]:
    response = httpx.post(f"http://127.0.0.1:{port}/v2/models/iris/infer", json=IRIS_ROW,
                          timeout=10)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def test_tail_keeps_the_last_lines_across_chunks() -> None:
    chunks = [b"one\ntw", b"o\nthree\n", b"four"]
    assert tail(chunks, None) == (b"one\ntwo\nthree\nfour", 18)
    assert tail(chunks, 2) == (b"three\nfour", 18)
    assert tail(chunks, 0) == (b"", 18)
    assert tail([b"a\n"], 5) == (b"a\n", 2)


def test_route_table_and_openapi_document_agree() -> None:
    served = {(r.method.lower(), r.template) for r in ROUTES}
    documented = {(method, path) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert served == documented
    schemas = OPENAPI["components"]["schemas"]
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(OPENAPI)}
    assert refs <= set(schemas), refs - set(schemas)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_every_error_is_json_with_its_status(http: httpx.Client, tmp_path: Path) -> None:
    assert ok(http.get("/openapi.json")) == json.loads(json.dumps(OPENAPI))
    junk = tmp_path / "junk.onnx"
    junk.write_text("not a model")
    obj = f"/v1/objects/{SERVICE}/ghost"
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/nope", {}, 404, "no route GET /nope; see /openapi.json"),
        ("POST", "/v1/objects", {}, 405, "use GET"),
        ("GET", "/v1/events", {"params": {"tail": "x"}}, 400, "tail='x': give a whole number"),
        ("GET", "/v1/events", {"params": {"after": "-1"}}, 400, "after='-1'"),
        ("GET", obj, {}, 404, "InferenceService/ghost does not exist"),
        ("DELETE", obj, {}, 404, "InferenceService/ghost does not exist"),
        ("GET", obj + "/logs", {}, 404, "InferenceService/ghost does not exist"),
        ("GET", obj + "/logs", {"params": {"follow": "maybe"}}, 400, "follow='maybe'"),
        ("GET", obj + "/rollout", {}, 404, "does not exist"),
        ("POST", obj + "/rollout/undo", {"content": b"[1]"}, 400, "toRevision"),
        ("POST", obj + "/rollout/undo", {"json": {"toRevision": 0}}, 400, "revision number"),
        ("GET", "/v1/replicas/ffff/logs", {}, 404, "no replica 'ffff'"),
        ("GET", "/v1/models/iris/1", {}, 404, "iris@1 is not in the registry"),
        ("DELETE", "/v1/models/iris/1", {}, 404, "iris@1 is not in the registry"),
        ("POST", "/v1/models", {"content": b"x"}, 400, "name is required"),
        ("POST", "/v1/models", {"params": {"name": "x", "format": "xml"}, "content": b"x"},
         400, "format='xml'"),
        ("POST", "/v1/models", {"params": {"name": "x"}, "content": junk.read_bytes()}, 422,
         "is not an ONNX model ONNX Runtime can load"),
        ("POST", "/v1/apply", {"params": {"base": "rel/dir"}, "content": b"x"}, 400,
         "give an absolute directory"),
        ("POST", "/v1/apply", {"content": b"\xff\xfe"}, 400, "not UTF-8"),
        ("POST", "/v1/apply", {"content": b"#" * (MAX_BODY + 1)}, 413, "over the limit"),
    ]
    for method, path, kwargs, status, fragment in cases:
        response = http.request(method, path, **kwargs)
        assert response.status_code == status, (method, path, response.text)
        assert response.headers["content-type"] == "application/json"
        assert fragment in response.json()["error"], (method, path, response.json())
    assert http.get("/metrics").status_code == 200  # the connection survived every refusal


def test_invalid_spec_is_422_with_every_field_path(http: httpx.Client, iris: Path) -> None:
    text = service_yaml(f"{{uri: {iris}}}", replicas=-1) + "---\n" + service_yaml(
        "iris@1", name="Bad_Name")
    body = ok(http.post("/v1/apply", content=text), 422)
    assert body["error"] == "the spec is not valid"
    assert [(e["document"], e["path"]) for e in body["errors"]] == [
        (1, "spec.replicas"), (2, "metadata.name")]
    broken = ok(http.post("/v1/apply", content="kind: [unclosed"), 422)
    assert broken["errors"][0]["line"] == 1 and "invalid YAML" in broken["errors"][0]["message"]
    unknown = ok(http.post("/v1/apply", content=service_yaml("iris@7")), 422)
    assert unknown["errors"][0]["path"] == "spec.model"
    assert "iris@7 is not in the registry" in unknown["errors"][0]["message"]
    assert ok(http.get("/v1/objects")) == {"objects": []}  # nothing was written


def test_a_service_through_the_api(http: httpx.Client, iris: Path) -> None:
    # relative paths resolve against `base`, the client's spec directory
    text = service_yaml("{uri: ./iris.onnx}", replicas=2)
    dry = apply(http, text, base=str(iris.parent), dryRun=1)
    assert dry["dry_run"] and dry["applied"][0]["action"] == "created"
    assert ok(http.get("/v1/objects")) == {"objects": []}
    applied = apply(http, text, base=str(iris.parent))["applied"]
    assert [(a["action"], a["generation"]) for a in applied] == [("created", 1)]
    assert apply(http, text, base=str(iris.parent))["applied"][0]["action"] == "unchanged"

    obj = until("two ready replicas", settled(http))
    assert obj["spec"]["spec"]["model"]["uri"] == str(iris)
    assert obj["status"]["replicas"] == {"desired": 2, "total": 2, "ready": 2,
                                         "states": {"ready": 2}}
    assert obj["status"]["rollout"]["revision"] == 1
    endpoint = obj["endpoint"]
    assert endpoint["host"] == "127.0.0.1"
    assert infer(endpoint["port"])["model_name"] == "iris"  # through the service's proxy
    listed = ok(http.get("/v1/objects", params={"kind": SERVICE}))["objects"]
    assert [(o["name"], o["endpoint"]) for o in listed] == [("iris", endpoint)]
    assert ok(http.get("/v1/objects", params={"kind": "Workload"})) == {"objects": []}

    # logs: one replica raw, the service's prefixed by replica id
    replicas = obj["replicas"]
    first = replicas[0]["id"]
    one = http.get(f"/v1/replicas/{first[:6]}/logs", params={"tail": 1})
    assert one.status_code == 200 and one.headers["content-type"].startswith("text/plain")
    assert one.text.startswith("uniframe-serve: serving iris") and one.text.count("\n") == 1
    both = http.get(f"/v1/objects/{SERVICE}/iris/logs").text.splitlines()
    assert sorted(line.split("]")[0][1:] for line in both) == sorted(r["id"] for r in replicas)
    assert http.get(f"/v1/objects/{SERVICE}/iris/logs", params={"tail": 0}).text == ""

    # follow: the open stream carries what a replica prints later (a restarted server's
    # greeting after a kill -9), and a client that hangs up does not disturb the daemon
    with http.stream("GET", f"/v1/objects/{SERVICE}/iris/logs", params={"follow": 1}) as stream:
        assert stream.headers["transfer-encoding"] == "chunked"
        lines = stream.iter_lines()
        assert sorted(next(lines).split("]")[0][1:] for _ in replicas) == sorted(
            r["id"] for r in replicas)
        pid = driver_for("process").get(first).pid
        assert pid is not None
        os.killpg(pid, signal.SIGKILL)
        again = next(line for line in lines if line.startswith(f"[{first}] "))
    assert again.startswith(f"[{first}] uniframe-serve: serving iris")
    obj = until("the restart", settled(http))
    assert [r["restarts"] for r in obj["replicas"] if r["id"] == first] == [1]

    # events, filtered by object and cut to the newest
    events = ok(http.get("/v1/events", params={"kind": SERVICE, "name": "iris"}))["events"]
    reasons = [e["reason"] for e in events]
    assert reasons[0] == "Created" and "RolloutComplete" in reasons
    newest = ok(http.get("/v1/events", params={"kind": SERVICE, "name": "iris", "tail": 2}))
    assert newest["events"] == events[-2:]
    later = ok(http.get("/v1/events", params={"after": events[-2]["id"]}))["events"]
    assert [e["id"] for e in later][:1] == [events[-1]["id"]]
    assert ok(http.get("/v1/events", params={"name": "other"})) == {"events": []}

    # delete: replicas, endpoint and object go
    assert ok(http.delete(f"/v1/objects/{SERVICE}/iris"))["deleted"]["name"] == "iris"
    until("object purged", lambda: ok(http.get("/v1/objects")) == {"objects": []}
          and ok(http.get("/v1/replicas")) == {"replicas": []})


def test_models_and_rollouts(http: httpx.Client, iris: Path) -> None:
    data = iris.read_bytes()
    pushed = ok(http.post("/v1/models", params={"name": "iris", "meta": "team=ml"},
                          content=data), 201)
    assert pushed["created"] and pushed["model"]["version"] == "1"
    assert pushed["model"]["metadata"] == {"team": "ml"}
    again = ok(http.post("/v1/models", params={"name": "iris"}, content=data), 200)
    assert not again["created"] and again["model"]["version"] == "1"
    second = ok(http.post("/v1/models", params={"name": "iris", "version": "2"}, content=data),
                201)
    assert second["model"]["version"] == "2"
    assert [m["version"] for m in ok(http.get("/v1/models"))["models"]] == ["1", "2"]
    assert ok(http.get("/v1/models", params={"name": "other"})) == {"models": []}
    shown = ok(http.get("/v1/models/iris/1"))
    assert Path(shown["path"]).read_bytes() == data and shown["used_by"] == []
    assert shown["inputs"] == [{"name": "X", "datatype": "FP32", "shape": [-1, 4]}]

    apply(http, service_yaml("iris@1", replicas=2))
    until("revision 1 rolled out", settled(http))
    refused = ok(http.delete("/v1/models/iris/1"), 409)
    assert refused["error"].startswith("model iris@1 is in use by InferenceService/iris")

    # a rolling update to iris@2, then undo back to revision 1
    apply(http, service_yaml("iris@2", replicas=2))
    obj = until("revision 2 rolled out", settled(http))
    assert obj["status"]["rollout"]["revision"] == 2
    assert obj["status"]["rollout"]["from_revision"] == 1
    revisions = ok(http.get(f"/v1/objects/{SERVICE}/iris/revisions"))["revisions"]
    assert [(r["number"], r["spec"]["spec"]["model"]["version"]) for r in revisions] == [
        (1, 1), (2, 2)]
    rollout = ok(http.get(f"/v1/objects/{SERVICE}/iris/rollout"))
    assert (rollout["state"], rollout["revision"], rollout["ready"]) == ("complete", 2, 2)
    assert "no canary to promote" in ok(
        http.post(f"/v1/objects/{SERVICE}/iris/rollout/promote"), 409)["error"]
    assert "has no revision 9" in ok(http.post(f"/v1/objects/{SERVICE}/iris/rollout/undo",
                                               json={"toRevision": 9}), 404)["error"]
    undone = ok(http.post(f"/v1/objects/{SERVICE}/iris/rollout/undo",
                          json={"toRevision": 1}))
    assert undone["spec"]["spec"]["model"]["version"] == 1 and undone["generation"] == 3
    obj = until("back on iris@1", settled(http))
    assert infer(obj["endpoint"]["port"])["model_name"] == "iris"
    assert ok(http.delete("/v1/models/iris/2"))["removed"]["version"] == "2"  # unused now

    # a canary: paused with its share of traffic, then promoted
    canary = ("  rollout: {strategy: canary, canary: {trafficPercent: 50}}\n")
    ok(http.post("/v1/models", params={"name": "iris", "version": "3"}, content=data), 201)
    apply(http, service_yaml("iris@3", replicas=2, extra=canary))
    paused = until("the canary paused", lambda: (r := ok(http.get(
        f"/v1/objects/{SERVICE}/iris/rollout")))["state"] == "paused" and r)
    assert paused["strategy"] == "canary" and paused["traffic_percent"] == 50
    promoted = ok(http.post(f"/v1/objects/{SERVICE}/iris/rollout/promote"))
    assert promoted["state"] == "promoted"
    obj = until("the canary promoted", settled(http))
    assert {r["revision"] for r in obj["replicas"]} == {obj["status"]["revision_digest"]}
