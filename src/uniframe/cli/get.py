"""``uniframe get`` and ``uniframe describe``: what the daemon knows, as tables or as its JSON.

``get`` is one line per thing (objects, replicas, models); ``describe`` is
everything about one object a person needs to see why it is or is not
serving: spec summary, endpoint, replicas with their last error, the
rollout, and the recent events.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape

from uniframe.cli.app import app, console, fail
from uniframe.cli.model import print_models
from uniframe.cli.output import OUTPUT_OPTION, age, check_output, print_data, print_table, when
from uniframe.cli.remote import DAEMON_OPTION, SERVICE_KIND, connect, object_kind, split_ref

REPLICA_WORDS = ("replicas", "replica", "rs")
MODEL_WORDS = ("models", "model")
RECENT_EVENTS = 10


def endpoint_text(obj: dict[str, Any]) -> str:
    endpoint = obj.get("endpoint")
    return f"{endpoint['host']}:{endpoint['port']}" if endpoint else "-"


def ready_text(obj: dict[str, Any]) -> str:
    """``ready/desired``; an autoscaled service adds its bounds: ``2/3 (0..8)``."""
    replicas = obj["status"]["replicas"]
    desired = replicas["desired"] if replicas["desired"] is not None else replicas["total"]
    scaling = obj["status"].get("autoscaling")
    bounds = f" ({scaling['min']}..{scaling['max']})" if scaling else ""
    return f"{replicas['ready']}/{desired}{bounds}"


def autoscaling_text(scaling: dict[str, Any]) -> str:
    """``describe``'s line: bounds, desired vs ready, the metric as last observed, panic."""
    desired = scaling["desired"] if scaling["desired"] is not None else "not decided yet"
    text = (f"min {scaling['min']}, max {scaling['max']}, desired {desired}, "
            f"ready {scaling['ready']}")
    if scaling.get("observed") is not None:
        unit = "in flight" if scaling["metric"] == "concurrency" else "requests/s"
        text += (f"; {scaling['metric']} {scaling['observed']:.2f} {unit} "
                 f"(target {scaling['target']:g} per replica)")
    return text + ("; panicking" if scaling.get("panicking") else "")


def rollout_cells(obj: dict[str, Any]) -> tuple[str, str]:
    rollout = obj["status"].get("rollout")
    if not rollout:
        return "-", "-"
    revision = str(rollout["revision"]) if rollout.get("revision") is not None else "-"
    return revision, str(rollout["state"])


def _object_rows(objects: list[dict[str, Any]]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for o in objects:
        revision, rollout = rollout_cells(o)
        runtime = o["spec"].get("spec", {}).get("runtime", "-")
        rows.append((o["name"], o["kind"], runtime, ready_text(o), revision, rollout,
                     endpoint_text(o), age(o["created_at"])))
    return rows


def print_objects(objects: list[dict[str, Any]]) -> None:
    if not objects:
        console.print("no objects; apply a spec with `uniframe apply -f FILE`", markup=False, soft_wrap=True)
        return
    print_table(("NAME", "KIND", "RUNTIME", "READY", "REVISION", "ROLLOUT", "ENDPOINT", "AGE"),
                _object_rows(objects))


def print_replicas(replicas: list[dict[str, Any]], with_object: bool = True) -> None:
    if not replicas:
        console.print("no replicas", markup=False, soft_wrap=True)
        return
    headers = ("ID", *(("OBJECT",) if with_object else ()), "DRIVER", "STATE", "RESTARTS",
               "PORT", "AGE", "LAST ERROR")
    print_table(headers, [
        (r["id"], *((f"{r['kind']}/{r['name']}",) if with_object else ()), r["driver"],
         r["state"], r["restarts"], r["host_port"] or "-", age(r["created_at"]),
         r["last_error"] or "-")
        for r in replicas], wrap=("LAST ERROR",))


@app.command()
def get(
    kind: str = typer.Argument(None, help="InferenceService (svc), Workload, replicas or models; "
                                          "or a NAME (of an InferenceService)"),
    name: str = typer.Argument(None, help="one object (or the replicas of one, or one model)"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """List objects, replicas or models: a table, or the API's JSON/YAML with -o."""
    check_output(output)
    with connect(daemon) as client:
        if kind is not None and kind.lower() in REPLICA_WORDS:
            replicas = client.replicas()
            if name is not None:
                replicas = [r for r in replicas if r["name"] == name or r["id"] == name]
            _show("replicas", replicas, output, print_replicas)
            return
        if kind is not None and kind.lower() in MODEL_WORDS:
            _show("models", client.models(name), output, lambda ms: print_models(ms, name))
            return
        api_kind = object_kind(kind) if kind is not None else None
        if kind is not None and api_kind is None:
            if name is not None:
                raise fail(f"unknown kind {kind!r}; use InferenceService (svc), Workload, "
                           "replicas or models")
            api_kind, name = SERVICE_KIND, kind
        if name is not None:
            assert api_kind is not None
            obj = client.object(api_kind, name)
            if output != "table":
                print_data(obj, output)
            else:
                print_objects([obj])
            return
        _show("objects", client.objects(api_kind), output, print_objects)


def _show(key: str, items: list[dict[str, Any]], output: str, table: Any) -> None:
    """A table, or the API's own document (``{key: items}``)."""
    if output != "table":
        print_data({key: items}, output)
    else:
        table(items)


def _model_text(spec: dict[str, Any]) -> str:
    model = spec.get("model")
    if isinstance(model, dict) and "uri" in model:
        return f"{model['uri']} ({model.get('format', 'onnx')})"
    if isinstance(model, dict):
        return f"{model.get('name')}@{model.get('version')} (registry)"
    return str(model)


def _size(value: object) -> str:
    if isinstance(value, int) and value % (1 << 20) == 0:
        return f"{value >> 20}Mi"
    return str(value)


def _field(label: str, value: object) -> None:
    console.print(f"[bold]{label + ':':<12}[/] {escape(str(value))}", soft_wrap=True)


@app.command()
def describe(
    ref: str = typer.Argument(..., help="KIND/NAME, or NAME of an InferenceService"),
    output: str = OUTPUT_OPTION,
    daemon: str = DAEMON_OPTION,
) -> None:
    """Everything about one object: spec, endpoint, replicas, rollout, recent events."""
    check_output(output)
    kind, name = split_ref(ref)
    with connect(daemon) as client:
        obj = client.object(kind, name)
        events = client.events(kind=kind, name=name, tail=RECENT_EVENTS)
    if output != "table":
        print_data({**obj, "events": events}, output)
        return
    body = obj["spec"].get("spec", {})
    _field("Name", obj["name"])
    _field("Kind", obj["kind"])
    _field("Created", f"{when(obj['created_at'])} ({age(obj['created_at'])} ago), "
                      f"generation {obj['generation']}")
    if "model" in body:
        _field("Model", _model_text(body))
    if "runtime" in body:
        _field("Runtime", body["runtime"])
    resources = body.get("resources") or {}
    if resources:
        _field("Resources", ", ".join(f"{k} {_size(v) if k == 'memory' else v}"
                                      for k, v in resources.items()))
    states = obj["status"]["replicas"]["states"]
    _field("Replicas", f"{ready_text(obj)} ready"
                       + (f" ({', '.join(f'{s}: {n}' for s, n in states.items())})"
                          if states else ""))
    scaling = obj["status"].get("autoscaling")
    if scaling:
        _field("Autoscaling", autoscaling_text(scaling))
    endpoint = obj.get("endpoint")
    _field("Endpoint", f"http://{endpoint['host']}:{endpoint['port']}" if endpoint
           else "none yet")
    rollout = obj["status"].get("rollout")
    if rollout:
        revision = f"revision {rollout['revision']}" if rollout.get("revision") else "rollout"
        origin = (f" from revision {rollout['from_revision']}"
                  if rollout.get("from_revision") else "")
        _field("Rollout", f"{revision}{origin}, {rollout['strategy']}, {rollout['state']}: "
                          f"{rollout['message']}")
    console.print()
    console.print("[bold]Replicas[/]")
    print_replicas(obj.get("replicas", []), with_object=False)
    console.print()
    console.print("[bold]Events[/]")
    print_events(events)


def print_events(events: list[dict[str, Any]], with_object: bool = False) -> None:
    if not events:
        console.print("no events", markup=False, soft_wrap=True)
        return
    headers = ("AGE", *(("OBJECT",) if with_object else ()), "TYPE", "REASON", "MESSAGE")
    print_table(headers, [
        (age(e["time"]), *((f"{e['kind']}/{e['name']}",) if with_object else ()), e["type"],
         e["reason"], e["message"]) for e in events], wrap=("MESSAGE",))
