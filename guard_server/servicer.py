"""gRPC servicers: ``drmguard.v1.Guard`` and the Open Inference Protocol ``inference.GRPCInferenceService``.

Thin translation between protobuf and :class:`GuardCore`; one decorator maps exceptions to status codes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as oip
from tritonclient.grpc import service_pb2_grpc as oip_grpc

from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc

from . import store as st
from .errors import InvalidRequestError, ModelNotFoundError, TooLargeError, status_for
from .service import GuardCore, Submission

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

TASK_FROM_PB = {pb.TASK_GAZE: "gaze", pb.TASK_HEADPOSE: "headpose"}
TASK_TO_PB = {v: k for k, v in TASK_FROM_PB.items()}
STATE_TO_PB = {s: getattr(pb, "STATE_" + s) for s in ("RECEIVED", "QUEUED", "SCANNING", "MITIGATING", "ADMITTED",
                                                       "REJECTED", "FAILED")}
VERDICT_TO_PB = {"benign": pb.VERDICT_BENIGN, "backdoored": pb.VERDICT_BACKDOORED}


def _abort(context: grpc.ServicerContext, exc: BaseException, name: str) -> None:
    code = status_for(exc)
    if code is None:
        logger.exception("unhandled error in %s", name)
        context.abort(grpc.StatusCode.INTERNAL, "internal error (see the server log)")
    context.abort(code, str(exc))


def rpc_errors(method: F) -> F:
    """Maps our exceptions to status codes (one table: errors.STATUS_TABLE); unknown -> INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if context.code() not in (None, grpc.StatusCode.OK) or _is_abort(exc):
                raise
            _abort(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def rpc_errors_stream(method: F) -> F:
    """The same for server-streaming methods (the generator raises while iterating)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if context.code() not in (None, grpc.StatusCode.OK) or _is_abort(exc):
                raise
            _abort(context, exc, method.__name__)

    return wrapper  # type: ignore[return-value]


def _is_abort(exc: BaseException) -> bool:
    # grpc's sync context.abort raises a bare Exception subclass private to grpc.
    return type(exc).__module__.startswith("grpc")


def _state(s: str) -> int:
    return STATE_TO_PB.get(s, pb.STATE_UNSPECIFIED)


def _verdict(v: str) -> int:
    return VERDICT_TO_PB.get(v or "", pb.VERDICT_UNSPECIFIED)


def decode_images(t: pb.Tensor, max_batch: int) -> np.ndarray:
    """Predict input -> float32 (N, C, H, W) in [0, 1], checked (shape, dtype, size, range)."""
    shape = tuple(int(d) for d in t.shape)
    if len(shape) != 4 or any(d <= 0 for d in shape):
        raise InvalidRequestError(f"input.shape must be (N, C, H, W) with positive sizes, got {list(shape)}")
    if shape[0] > max_batch:
        raise TooLargeError(f"batch of {shape[0]} exceeds the server's cap of {max_batch}; split the batch")
    count = int(np.prod(shape))
    if t.dtype == pb.DATA_TYPE_FLOAT32:
        if len(t.data) != count * 4:
            raise InvalidRequestError(f"input.data has {len(t.data)} bytes; shape {list(shape)} as float32 needs "
                                      f"{count * 4}")
        x = np.frombuffer(t.data, dtype="<f4").reshape(shape)
        lo, hi = float(x.min()), float(x.max())
        if not (lo >= 0.0 and hi <= 1.0):  # also catches NaN
            raise InvalidRequestError(f"float32 images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; "
                                      "divide 0-255 data by 255 or send DATA_TYPE_UINT8")
        return x
    if t.dtype == pb.DATA_TYPE_UINT8:
        if len(t.data) != count:
            raise InvalidRequestError(f"input.data has {len(t.data)} bytes; shape {list(shape)} as uint8 needs {count}")
        return np.frombuffer(t.data, dtype=np.uint8).reshape(shape).astype(np.float32) * np.float32(1.0 / 255.0)
    raise InvalidRequestError("input.dtype must be DATA_TYPE_FLOAT32 (in [0, 1]) or DATA_TYPE_UINT8 (0-255)")


class GuardServicer(pb_grpc.GuardServicer):
    """``drmguard.v1.Guard``."""

    def __init__(self, core: GuardCore) -> None:
        self.core = core
        self.settings = core.settings

    # --- uploads -----------------------------------------------------------------------------------
    @rpc_errors
    def VetModel(self, request_iterator: Iterator[pb.VetModelRequest], context: grpc.ServicerContext) -> Any:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "header":
            raise InvalidRequestError("the first VetModel message must be a header (name, version, task, sha256)")
        h = first.header
        task = TASK_FROM_PB.get(h.task, "")
        # Refuse bad headers before accepting any bytes.
        self.core.check_header(h.name, h.version, task, h.profile)
        cap_m, cap_b = self.settings.max_model_bytes, self.settings.max_benign_bytes
        if h.model_size > cap_m:
            raise TooLargeError(f"model_size {h.model_size} bytes exceeds the cap of {cap_m} bytes")
        model, benign = bytearray(), bytearray()
        for msg in request_iterator:
            kind = msg.WhichOneof("msg")
            if kind == "model_chunk":
                if benign:
                    raise InvalidRequestError("model_chunk after benign_chunk: send all model chunks first")
                model += msg.model_chunk
                if len(model) > cap_m:
                    raise TooLargeError(f"the model exceeds the cap of {cap_m} bytes (max_model_bytes)")
            elif kind == "benign_chunk":
                if h.benign_set_id:
                    raise InvalidRequestError("benign_chunk sent although header.benign_set_id is set; send one or "
                                              "the other")
                benign += msg.benign_chunk
                if len(benign) > cap_b:
                    raise TooLargeError(f"the benign set exceeds the cap of {cap_b} bytes (max_benign_bytes)")
            elif kind == "header":
                raise InvalidRequestError("only the first VetModel message may be a header")
        if not model:
            raise InvalidRequestError("no model bytes received: send the ONNX file in model_chunk messages")
        if h.model_size and h.model_size != len(model):
            raise InvalidRequestError(f"header.model_size is {h.model_size} but {len(model)} bytes arrived")
        res = self.core.submit(Submission(
            name=h.name, version=h.version, task=task, sha256=h.sha256, model=bytes(model), profile=h.profile,
            references=[(r.name, r.version) for r in h.references], benign_set_id=h.benign_set_id,
            benign=bytes(benign), benign_sha256=h.benign_sha256))
        return pb.VetModelResponse(scan_id=res.scan_id, name=res.name, version=res.version, state=_state(res.state),
                                   reused=res.reused, message=res.message)

    @rpc_errors
    def UploadBenignSet(self, request_iterator: Iterator[pb.UploadBenignSetRequest],
                        context: grpc.ServicerContext) -> Any:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("msg") != "header":
            raise InvalidRequestError("the first UploadBenignSet message must be a header")
        h = first.header
        cap = self.settings.max_benign_bytes
        if h.size > cap:
            raise TooLargeError(f"size {h.size} bytes exceeds the cap of {cap} bytes (max_benign_bytes)")
        buf = bytearray()
        for msg in request_iterator:
            if msg.WhichOneof("msg") != "chunk":
                raise InvalidRequestError("only the first UploadBenignSet message may be a header")
            buf += msg.chunk
            if len(buf) > cap:
                raise TooLargeError(f"the benign set exceeds the cap of {cap} bytes (max_benign_bytes)")
        if not buf:
            raise InvalidRequestError("no bytes received: send the .npz file in chunk messages")
        sid, n, shape, labels = self.core.add_benign(bytes(buf), task=TASK_FROM_PB.get(h.task, ""), sha256=h.sha256)
        return pb.UploadBenignSetResponse(benign_set_id=sid, num_images=n, image_shape=list(shape), has_labels=labels)

    # --- scans -------------------------------------------------------------------------------------
    def _scan_row(self, scan_id: str) -> st.Row:
        row = self.core.store.scan(scan_id) if scan_id else None
        if row is None:
            raise ModelNotFoundError(f"scan {scan_id!r} not found; use the scan_id VetModel returned")
        return row

    @rpc_errors_stream
    def WatchScan(self, request: pb.WatchScanRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        row = self._scan_row(request.scan_id)
        seen = self.core.hub.length(row.scan_id)
        row = self._scan_row(request.scan_id)
        final = row.state in st.FINAL_STATES
        yield self._event(row.scan_id, {"state": row.state, "message": row.reason or "current state",
                                        "verdict": row.verdict, "perturbation_ratio": row.perturbation_ratio,
                                        "final": final, "admitted_version": row.admitted_version,
                                        "mitigated": bool(row.mitigated)})
        while not final and context.is_active():
            events, seen = self.core.hub.wait(row.scan_id, seen, timeout=1.0)
            for ev in events:
                yield self._event(row.scan_id, ev)
                final = final or bool(ev.get("final"))
            if not events and not final:
                # Catch a final state the hub no longer holds (e.g. forgotten) from the store.
                cur = self._scan_row(row.scan_id)
                if cur.state in st.FINAL_STATES and self.core.hub.length(row.scan_id) == 0:
                    yield self._event(row.scan_id, {"state": cur.state, "message": cur.reason, "final": True,
                                                    "verdict": cur.verdict, "admitted_version": cur.admitted_version,
                                                    "mitigated": bool(cur.mitigated),
                                                    "perturbation_ratio": cur.perturbation_ratio})
                    final = True
                if self.core.stopping:
                    return

    @staticmethod
    def _event(scan_id: str, ev: dict[str, Any]) -> pb.WatchScanResponse:
        msg = pb.WatchScanResponse(scan_id=scan_id, state=_state(ev.get("state", "")), phase=ev.get("phase", ""),
                                   step=int(ev.get("step") or 0), total=int(ev.get("total") or 0),
                                   message=str(ev.get("message") or ""), verdict=_verdict(ev.get("verdict", "")),
                                   final=bool(ev.get("final")), admitted_version=ev.get("admitted_version") or "",
                                   mitigated=bool(ev.get("mitigated")), timestamp=time.time())
        for k, v in (ev.get("losses") or {}).items():
            msg.losses[str(k)] = float(v)
        if ev.get("perturbation_ratio") is not None:
            msg.perturbation_ratio = float(ev["perturbation_ratio"])
        return msg

    @rpc_errors
    def GetScan(self, request: pb.GetScanRequest, context: grpc.ServicerContext) -> Any:
        r = self._scan_row(request.scan_id)
        s = pb.Scan(scan_id=r.scan_id, name=r.name, version=r.version, task=TASK_TO_PB.get(r.task, 0), sha256=r.sha256,
                    profile=r.profile, state=_state(r.state), verdict=_verdict(r.verdict), reason=r.reason,
                    mitigated=bool(r.mitigated), admitted_version=r.admitted_version, report_json=r.report,
                    mitigation_report_json=r.mitigation_report, rescan_report_json=r.rescan_report,
                    benign_set_id=r.benign_id, created_at=r.created_at, updated_at=r.updated_at,
                    reused_from=r.reused_from,
                    references=[pb.ModelRef(name=n, version=v) for n, v in json.loads(r.refs)])
        for f in ("perturbation_ratio", "clean_error_before", "clean_error_after"):
            if getattr(r, f) is not None:
                setattr(s, f, float(getattr(r, f)))
        return pb.GetScanResponse(scan=s)

    @rpc_errors
    def CancelScan(self, request: pb.CancelScanRequest, context: grpc.ServicerContext) -> Any:
        state = self.core.cancel(request.scan_id)
        return pb.CancelScanResponse(scan_id=request.scan_id, state=_state(state))

    @rpc_errors
    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        out = pb.ListModelsResponse()
        for m in self.core.store.models(request.name):
            lm = self.core._served.get(m.name)
            served = lm.version if lm is not None else ""
            pm = out.models.add(name=m.name, task=TASK_TO_PB.get(m.task, 0), served_version=served,
                                pinned=bool(m.pinned), provider=lm.provider if lm is not None else "")
            for v in self.core.store.versions(m.name):
                meta = json.loads(v.meta or "{}")
                pm.versions.add(version=v.version, state=_state(v.state), verdict=_verdict(v.verdict), reason=v.reason,
                                sha256=v.sha256, mitigated=bool(v.mitigated), parent_version=v.parent_version,
                                scan_id=v.scan_id, served=(v.version == served), created_at=v.created_at,
                                input_shape=meta.get("input_shape", []), input_name=meta.get("input_name", ""),
                                output_name=meta.get("output_name", ""), output_dim=int(meta.get("output_dim", 0)))
        return out

    # --- inference ---------------------------------------------------------------------------------
    def Predict(self, request: pb.PredictRequest, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        name, version = request.name, request.version
        lm = None
        try:
            x = decode_images(request.input, self.settings.max_batch)
            lm, y = self.core.predict(name, version, x)
            y = np.ascontiguousarray(y, dtype="<f4")
            resp = pb.PredictResponse(name=name, version=lm.version, output=pb.Tensor(
                dtype=pb.DATA_TYPE_FLOAT32, shape=list(y.shape), data=y.tobytes()))
        except Exception as exc:  # noqa: BLE001
            code = status_for(exc) or grpc.StatusCode.INTERNAL
            self._count(name, lm, code.name)
            _abort(context, exc, "Predict")
            raise  # unreachable: abort raises
        self._count(name, lm, "OK")
        self.core.metrics.predict_latency.labels(name, lm.version).observe(time.perf_counter() - t0)
        return resp

    def _count(self, name: str, lm: Any, code: str) -> None:
        # Labels only for served models: unknown names must not grow the label set.
        if lm is not None:
            self.core.metrics.predict_requests.labels(name, lm.version, code).inc()
        elif self.core.is_served(name):
            self.core.metrics.predict_requests.labels(name, "", code).inc()
        else:
            self.core.metrics.predict_requests.labels("_unknown", "", code).inc()

    # --- admin -------------------------------------------------------------------------------------
    @rpc_errors
    def PinVersion(self, request: pb.PinVersionRequest, context: grpc.ServicerContext) -> Any:
        served, prev, pinned = self.core.pin(request.name, request.version)
        return pb.PinVersionResponse(name=request.name, served_version=served, previous_version=prev, pinned=pinned)

    @rpc_errors
    def Rollback(self, request: pb.RollbackRequest, context: grpc.ServicerContext) -> Any:
        served, prev = self.core.rollback(request.name)
        return pb.RollbackResponse(name=request.name, served_version=served, previous_version=prev, pinned=True)


_NP_FROM_OIP = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "UINT8": np.uint8, "INT64": np.int64,
                "INT32": np.int32}
_CONTENTS_FIELD = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT64": "int64_contents",
                   "INT32": "int_contents", "UINT8": "uint_contents"}


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol (KServe v2 / Triton) over the admitted models; stock tritonclient works."""

    def __init__(self, core: GuardCore, version: str) -> None:
        self.core = core
        self.version = version
        self.ready = True

    def ServerLive(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerReadyResponse(ready=self.ready and not self.core.stopping)

    def ServerMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        return oip.ServerMetadataResponse(name="drmguard", version=self.version, extensions=[])

    def ModelReady(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self.core.served_model(request.name, request.version)
            return oip.ModelReadyResponse(ready=True)
        except Exception:  # noqa: BLE001 - readiness is a boolean, never an error
            return oip.ModelReadyResponse(ready=False)

    @rpc_errors
    def ModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        lm = self.core.served_model(request.name, request.version)
        versions = [v.version for v in self.core.store.admitted_versions(request.name)]
        return oip.ModelMetadataResponse(
            name=request.name, versions=versions, platform="onnxruntime_onnx",
            inputs=[oip.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.oip_datatype, shape=s.shape)
                    for s in lm.inputs],
            outputs=[oip.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.oip_datatype, shape=s.shape)
                     for s in lm.outputs])

    def ModelInfer(self, request: Any, context: grpc.ServicerContext) -> Any:
        t0 = time.perf_counter()
        lm = None
        try:
            lm = self.core.served_model(request.model_name, request.model_version)
            feeds = self._feeds(request, lm)
            outs = lm.run(feeds)
            wanted = [o.name for o in request.outputs] or [s.name for s in lm.outputs]
            by_name = {s.name: (s, o) for s, o in zip(lm.outputs, outs, strict=True)}
            resp = oip.ModelInferResponse(model_name=request.model_name, model_version=lm.version, id=request.id)
            for n in wanted:
                if n not in by_name:
                    raise InvalidRequestError(f"unknown output {n!r}; the model's outputs are {list(by_name)}")
                spec, arr = by_name[n]
                arr = np.ascontiguousarray(arr)
                resp.outputs.add(name=n, datatype=spec.oip_datatype, shape=list(arr.shape))
                resp.raw_output_contents.append(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        except Exception as exc:  # noqa: BLE001
            code = status_for(exc) or grpc.StatusCode.INTERNAL
            GuardServicer._count(self, request.model_name, lm, code.name)  # type: ignore[arg-type]
            _abort(context, exc, "ModelInfer")
            raise
        GuardServicer._count(self, request.model_name, lm, "OK")  # type: ignore[arg-type]
        self.core.metrics.predict_latency.labels(request.model_name, lm.version).observe(time.perf_counter() - t0)
        return resp

    def _feeds(self, request: Any, lm: Any) -> dict[str, np.ndarray]:
        specs = {s.name: s for s in lm.inputs}
        raw = list(request.raw_input_contents)
        if raw and len(raw) != len(request.inputs):
            raise InvalidRequestError(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs; send one per "
                                      "input, in order")
        feeds: dict[str, np.ndarray] = {}
        for i, t in enumerate(request.inputs):
            spec = specs.get(t.name)
            if spec is None:
                raise InvalidRequestError(f"unknown input {t.name!r}; the model's inputs are {list(specs)}")
            if t.datatype != spec.oip_datatype:
                raise InvalidRequestError(f"input {t.name!r} must be {spec.oip_datatype}, got {t.datatype!r}")
            shape = [int(d) for d in t.shape]
            if len(shape) != len(spec.shape) or any(s != d for s, d in zip(shape, spec.shape, strict=True) if d >= 0) \
                    or any(s <= 0 for s in shape):
                raise InvalidRequestError(f"input {t.name!r} has shape {shape}; the model needs {spec.shape} "
                                          "(-1 = any)")
            if shape[0] > self.core.settings.max_batch:
                raise TooLargeError(f"batch of {shape[0]} exceeds the server's cap of {self.core.settings.max_batch}")
            dt = np.dtype(_NP_FROM_OIP[spec.oip_datatype]).newbyteorder("<")
            count = int(np.prod(shape))
            if raw:
                if len(raw[i]) != count * dt.itemsize:
                    raise InvalidRequestError(f"input {t.name!r}: {len(raw[i])} raw bytes, shape {shape} needs "
                                              f"{count * dt.itemsize}")
                arr = np.frombuffer(raw[i], dtype=dt).reshape(shape)
            else:
                field = _CONTENTS_FIELD.get(spec.oip_datatype)
                vals = getattr(t.contents, field) if field else []
                if len(vals) != count:
                    raise InvalidRequestError(f"input {t.name!r}: {len(vals)} values in contents, shape {shape} needs "
                                              f"{count}")
                arr = np.asarray(vals, dtype=dt.newbyteorder("=")).reshape(shape)
            feeds[t.name] = arr
        missing = set(specs) - set(feeds)
        if missing:
            raise InvalidRequestError(f"missing inputs {sorted(missing)}")
        return feeds


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
