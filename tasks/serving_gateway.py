"""The HTTP gateway of `wf serve`: wf's own endpoints and the Open Inference Protocol (KServe
v2) in front of one :class:`tasks.serving.ModelDeployment` per model.

    GET  /v1/models                                    every model, its classes and metrics
    POST /v1/models/<dataset>/<method>:predict         one image (raw bytes), or a multipart
                                                       form of several: label and probabilities
    GET  /v2/health/live, /v2/health/ready
    GET  /v2                                           server metadata, its extensions
    GET  /v2/models/<dataset>-<method>                 metadata: inputs, outputs, classes
    GET  /v2/models/<dataset>-<method>/ready           model ready
    POST /v2/models/<dataset>-<method>/infer           BYTES (image files) or UINT8 pixels, in
                                                       JSON or the binary tensor extension;
                                                       outputs in JSON or binary, as asked

Every refusal is one line of JSON, ``{"error": ...}``, with its status. (No ``from __future__
import annotations`` here: FastAPI reads the routes' annotations to find the ``Request``.)
"""

import asyncio
import json
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.exceptions import BackPressureError

from storage.runs import job_run_name
from tasks.classifier import Answer
from tasks.serving import (
    BINARY_HEADER,
    Rejected,
    ServedModel,
    decode_tensor_input,
    encode_outputs,
    split_binary_request,
)

api = FastAPI(title="wf serve", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(Rejected)
async def _refused(_: Request, error: Rejected) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


@serve.deployment
@serve.ingress(api)
class Gateway:
    def __init__(self, served: list[ServedModel], handles: list[Any], max_body_bytes: int) -> None:
        self.served = {f.name: f for f in served}
        self.handles = {f.name: handle for f, handle in zip(served, handles, strict=True)}
        self.max_body_bytes = max_body_bytes

    def _model(self, name: str) -> ServedModel:
        if name not in self.served:
            raise Rejected(404, f"no model {name!r}; served: {', '.join(sorted(self.served))}")
        return self.served[name]

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise Rejected(
                413, f"body of {declared} bytes is over the {self.max_body_bytes}-byte limit"
            )
        body = await request.body()
        if len(body) > self.max_body_bytes:
            raise Rejected(413, f"body is over the {self.max_body_bytes}-byte limit")
        if not body:
            raise Rejected(400, "empty body: send the image's bytes")
        return body

    async def _predict(self, name: str, items: list[bytes | np.ndarray]) -> list[Answer]:
        handle = self.handles[name]
        try:
            rows = await asyncio.gather(*(handle.predict.remote(item) for item in items))
        except BackPressureError:
            raise Rejected(503, f"model {name} is over capacity; retry later") from None
        for row in rows:
            if isinstance(row, Rejected):
                raise row
        return rows

    def _answer(self, served: ServedModel, answer: Answer) -> dict[str, Any]:
        """The label (``None`` when the model abstains, and why), every probability, the model."""
        row = answer.probabilities
        best = int(np.argmax(row))
        return {
            "label": None if answer.abstained else served.classes[best],
            "probabilities": {c: float(p) for c, p in zip(served.classes, row, strict=True)},
            "abstained": answer.abstained,
            "reason": answer.reason,
            "model": served.describe(),
        }

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        return {"ready": True}

    @api.get("/v1/models")
    async def models(self) -> list[dict[str, Any]]:
        return [{**f.describe(), "name": f.name, "classes": list(f.classes), "metrics": f.metrics,
                 "input_size": list(f.input_size)} for f in self.served.values()]  # fmt: skip

    @api.post("/v1/models/{dataset}/{method}:predict")
    async def predict(self, dataset: str, method: str, request: Request) -> Any:
        served = self._model(job_run_name(dataset, method))
        body = await self._body(request)
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            images = [await part.read() for _, part in form.multi_items() if hasattr(part, "read")]
            if not images:
                raise Rejected(400, "the form holds no file")
            rows = await self._predict(served.name, images)
            return [self._answer(served, row) for row in rows]
        (row,) = await self._predict(served.name, [body])
        return self._answer(served, row)

    @api.get("/v2/models/{name}")
    async def metadata(self, name: str) -> dict[str, Any]:
        served = self._model(name)
        height, width = served.input_size
        return {
            "name": name,
            "platform": "keras",
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8", "shape": [-1, height, width, 3]}],
            "outputs": [{"name": "probabilities", "datatype": "FP64",
                         "shape": [-1, len(served.classes)]},
                        {"name": "abstained", "datatype": "BOOL", "shape": [-1]},
                        {"name": "reason", "datatype": "BYTES", "shape": [-1]}],
            "parameters": {"classes": list(served.classes), **served.describe()},
        }  # fmt: skip

    @api.get("/v2/models/{name}/ready")
    async def model_ready(self, name: str) -> dict[str, Any]:
        self._model(name)  # 404 for a model it does not serve
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def version_ready(self, name: str, version: str) -> dict[str, Any]:
        return await self.model_ready(name)

    @api.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("wf")
        except PackageNotFoundError:  # run from a checkout that was never installed
            installed = "unknown"
        return {"name": "wf", "version": installed, "extensions": ["binary_tensor_data"]}

    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def version_infer(self, name: str, version: str, request: Request) -> Response:
        return await self.infer(name, request)

    @api.post("/v2/models/{name}/infer")
    async def infer(self, name: str, request: Request) -> Response:
        """One input of images (BYTES or UINT8), in JSON or in the binary tensor extension
        (``Inference-Header-Content-Length``); the outputs in JSON or binary, as asked."""
        served = self._model(name)
        body = await self._body(request)
        payload, binary = split_binary_request(body, request.headers.get(BINARY_HEADER))
        if len(payload["inputs"]) != 1:
            raise Rejected(400, 'expected {"inputs": [one input]}: one tensor of images')
        images = decode_tensor_input(payload["inputs"][0], served.input_size, binary[0])
        rows = await self._predict(name, images)
        outputs = [{"name": "probabilities", "datatype": "FP64",
                    "shape": [len(rows), len(served.classes)],
                    "data": [float(p) for row in rows for p in row.probabilities]},
                   {"name": "abstained", "datatype": "BOOL", "shape": [len(rows)],
                    "data": [row.abstained for row in rows]},
                   {"name": "reason", "datatype": "BYTES", "shape": [len(rows)],
                    "data": [row.reason for row in rows]}]  # fmt: skip
        shown, tail = encode_outputs(payload, outputs)
        answer = {"model_name": name, "id": payload.get("id", ""), "outputs": shown,
                  "parameters": {"classes": list(served.classes)}}  # fmt: skip
        if not tail:
            return JSONResponse(answer)
        head = json.dumps(answer).encode()
        return Response(head + tail, media_type="application/octet-stream",
                        headers={BINARY_HEADER: str(len(head))})  # fmt: skip
