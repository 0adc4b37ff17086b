"""``uniframe infer``: a small OIP v2 client for trying a served model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import typer
from rich.table import Table

from uniframe.cli.app import app, console, fail
from uniframe.cli.output import OUTPUT_OPTION, check_output, print_data


def _shape(data: Any) -> list[int]:
    shape: list[int] = []
    while isinstance(data, list):
        shape.append(len(data))
        data = data[0] if data else None
    return shape


@app.command()
def infer(
    url: str = typer.Argument(..., help="server base URL, e.g. http://localhost:8080"),
    model: str = typer.Argument(..., help="model name"),
    data: str = typer.Option(..., "--data", "-d", help="JSON tensor, e.g. '[[5.1,3.5,1.4,0.2]]'"),
    input_name: str = typer.Option(None, "--input", help="input name (default: the model's first)"),
    datatype: str = typer.Option(None, "--datatype", help="OIP datatype (default: the model's)"),
    version: str = typer.Option(None, "--model-version"),
    output: str = OUTPUT_OPTION,
    timeout: float = typer.Option(30.0, "--timeout"),
) -> None:
    """Send one inference request and print the outputs."""
    check_output(output)
    try:
        tensor = json.loads(data)
    except json.JSONDecodeError as exc:
        raise fail(f"--data is not JSON: {exc}") from None
    base = url.rstrip("/") + f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    with httpx.Client(timeout=timeout) as client:
        try:
            if input_name is None or datatype is None:
                meta = client.get(base)
                if meta.status_code != 200:
                    raise fail(f"{base}: {meta.status_code} {_error_of(meta)}")
                first = meta.json()["inputs"][0]
                input_name = input_name or first["name"]
                datatype = datatype or first["datatype"]
            body = {"inputs": [{"name": input_name, "datatype": datatype,
                                "shape": _shape(tensor), "data": tensor}]}
            resp = client.post(base + "/infer", json=body)
        except httpx.HTTPError as exc:
            raise fail(f"cannot reach {url}: {exc}") from None
    if resp.status_code != 200:
        raise fail(f"{resp.status_code}: {_error_of(resp)}")
    result = resp.json()
    if output != "table":
        print_data(result, output)
        return
    table = Table(title=f"{result.get('model_name')} v{result.get('model_version')}")
    for col in ("output", "datatype", "shape", "data"):
        table.add_column(col)
    for out in result["outputs"]:
        table.add_row(out["name"], out["datatype"], str(out["shape"]), json.dumps(out.get("data")))
    console.print(table)


def _error_of(resp: httpx.Response) -> str:
    try:
        return str(resp.json().get("error", resp.text))
    except ValueError:
        return resp.text[:500]
