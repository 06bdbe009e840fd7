"""``GuardClient``: a typed wrapper over the ``drmguard.v1.Guard`` stub (imports grpc, numpy, guard_api only)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np

from guard_api.drmguard.v1 import guard_pb2 as pb
from guard_api.drmguard.v1 import guard_pb2_grpc as pb_grpc

from .arrays import check_images, read_file_bytes
from .errors import GuardError
from .types import (
    Admission,
    ModelVersionInfo,
    Prediction,
    ScanEvent,
    ScanInfo,
    VetTicket,
)

__all__ = ["GuardClient", "DEFAULT_CHUNK_SIZE"]

DEFAULT_CHUNK_SIZE = 1 << 20
# Large enough for a 32x3x224x224 float32 batch either way; the server enforces its own caps.
_MAX_MESSAGE = 64 << 20

_TASKS = {"gaze": pb.TASK_GAZE, "headpose": pb.TASK_HEADPOSE}
_TASK_NAMES = {v: k for k, v in _TASKS.items()}
_VERDICTS = {pb.VERDICT_BENIGN: "benign", pb.VERDICT_BACKDOORED: "backdoored"}

# grpc.health.v1 is spoken with hand-encoded messages so that the client needs no
# grpcio-health-checking: HealthCheckRequest{string service = 1}, HealthCheckResponse{enum status = 1}.
_HEALTH_METHOD = "/grpc.health.v1.Health/Check"
_HEALTH_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

T = TypeVar("T")
Source = str | os.PathLike[str] | bytes


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _encode_health_request(service: str) -> bytes:
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def _decode_health_response(data: bytes) -> int:
    # Only field 1 (varint) matters; skip anything else a newer server may add.
    i, status = 0, 0
    while i < len(data):
        key = data[i]
        i += 1
        wire = key & 7
        val = 0
        if wire == 0:
            shift = 0
            while True:
                b = data[i]
                i += 1
                val |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            if key >> 3 == 1:
                status = val
        elif wire == 2:
            shift, ln = 0, 0
            while True:
                b = data[i]
                i += 1
                ln |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            i += ln
        else:  # fixed32/64: not used by this message
            i += 4 if wire == 5 else 8
    return status


def _state_name(state: int) -> str:
    name = pb.State.Name(state) if state in pb.State.values() else "STATE_UNSPECIFIED"
    return name.removeprefix("STATE_")


def _task_value(task: str) -> int:
    try:
        return _TASKS[task]
    except KeyError:
        raise GuardError(
            grpc.StatusCode.INVALID_ARGUMENT, f"unknown task {task!r}; use one of {sorted(_TASKS)}"
        ) from None


def _json_or_empty(text: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        obj = json.loads(text)
    except ValueError:
        return {"raw": text}
    return obj if isinstance(obj, dict) else {"value": obj}


def _opt(msg: Any, field: str) -> float | None:
    return float(getattr(msg, field)) if msg.HasField(field) else None


def _read_source(src: Source, *, what: str) -> bytes:
    if isinstance(src, bytes | bytearray | memoryview):
        return bytes(src)
    try:
        return read_file_bytes(src, what=what)
    except ValueError as exc:
        raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None


def _chunks(data: bytes, size: int) -> Iterator[bytes]:
    for off in range(0, len(data), size):
        yield data[off : off + size]


def _tensor_to_array(t: pb.Tensor) -> np.ndarray:
    dtype = {pb.DATA_TYPE_FLOAT32: np.dtype("<f4"), pb.DATA_TYPE_UINT8: np.dtype("u1")}.get(t.dtype)
    if dtype is None:
        raise GuardError(grpc.StatusCode.INTERNAL, f"the server answered an unknown tensor dtype {t.dtype}")
    shape = tuple(int(s) for s in t.shape)
    arr = np.frombuffer(t.data, dtype=dtype)
    if arr.size != int(np.prod(shape, dtype=np.int64)):
        raise GuardError(
            grpc.StatusCode.INTERNAL,
            f"the server's output tensor has {arr.size} values for shape {shape}",
        )
    return arr.reshape(shape).astype(np.float32, copy=False)


def _array_to_tensor(images: np.ndarray) -> pb.Tensor:
    dt = pb.DATA_TYPE_UINT8 if images.dtype == np.uint8 else pb.DATA_TYPE_FLOAT32
    data = images.astype("<f4", copy=False) if dt == pb.DATA_TYPE_FLOAT32 else images
    return pb.Tensor(dtype=dt, shape=list(images.shape), data=np.ascontiguousarray(data).tobytes())


def scan_from_proto(s: pb.Scan) -> ScanInfo:
    """Converts a ``drmguard.v1.Scan`` into a ``ScanInfo``."""
    return ScanInfo(
        scan_id=s.scan_id,
        name=s.name,
        version=s.version,
        task=_TASK_NAMES.get(s.task, ""),
        state=_state_name(s.state),
        verdict=_VERDICTS.get(s.verdict),
        reason=s.reason,
        perturbation_ratio=_opt(s, "perturbation_ratio"),
        mitigated=bool(s.mitigated),
        admitted_version=s.admitted_version or None,
        sha256=s.sha256,
        profile=s.profile,
        benign_set_id=s.benign_set_id,
        clean_error_before=_opt(s, "clean_error_before"),
        clean_error_after=_opt(s, "clean_error_after"),
        reused_from=s.reused_from or None,
        created_at=float(s.created_at),
        updated_at=float(s.updated_at),
        report=_json_or_empty(s.report_json),
        mitigation=_json_or_empty(s.mitigation_report_json),
        rescan=_json_or_empty(s.rescan_report_json),
    )


def event_from_proto(e: pb.WatchScanResponse) -> ScanEvent:
    """Converts a ``WatchScanResponse`` into a ``ScanEvent``."""
    return ScanEvent(
        scan_id=e.scan_id,
        state=_state_name(e.state),
        phase=e.phase,
        step=int(e.step),
        total=int(e.total),
        losses={str(k): float(v) for k, v in e.losses.items()},
        perturbation_ratio=_opt(e, "perturbation_ratio"),
        message=e.message,
        verdict=_VERDICTS.get(e.verdict),
    )


class GuardClient:
    """A synchronous client of the guard service.

    Args:
        target: ``HOST:PORT`` of the server.
        token: bearer token sent as ``authorization: Bearer <token>`` (roles: registry, vehicle, admin).
        tls_ca: PEM path of the CA that signed the server certificate; enables TLS.
        tls_cert, tls_key: PEM paths of a client certificate and key (mutual TLS); need ``tls_ca``.
        timeout: deadline in seconds for unary calls and uploads (streams that follow a scan have none).

    Every method raises ``GuardError`` (with the gRPC status code and the server's message) on failure.
    Use it as a context manager, or call ``close()``.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls_ca: str | os.PathLike[str] | None = None,
        tls_cert: str | os.PathLike[str] | None = None,
        tls_key: str | os.PathLike[str] | None = None,
        timeout: float | None = 60.0,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not target or ":" not in target:
            raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, f"server address {target!r} must be HOST:PORT")
        if (tls_cert is None) != (tls_key is None):
            raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, "mutual TLS needs both tls_cert and tls_key")
        if tls_cert is not None and tls_ca is None:
            raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, "mutual TLS needs tls_ca (the server's CA) too")
        opts = [
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            *options,
        ]
        self.target = target
        self.timeout = timeout
        if tls_ca is not None:

            def _pem(p: str | os.PathLike[str] | None, what: str) -> bytes | None:
                if p is None:
                    return None
                try:
                    return Path(p).read_bytes()
                except OSError as exc:
                    raise GuardError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"{what} {str(p)!r}: cannot be read ({exc.strerror})"
                    ) from None

            creds = grpc.ssl_channel_credentials(
                root_certificates=_pem(tls_ca, "TLS CA"),
                private_key=_pem(tls_key, "TLS key"),
                certificate_chain=_pem(tls_cert, "TLS certificate"),
            )
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._stub = pb_grpc.GuardStub(self._channel)
        self._health = self._channel.unary_unary(
            _HEALTH_METHOD,
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )

    # -------------------------------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def __enter__(self) -> GuardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[..., T], request: Any, *, timeout: float | None | str = "default") -> T:
        try:
            return fn(
                request,
                timeout=self.timeout if timeout == "default" else timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            raise GuardError.from_rpc(exc) from None

    # ------------------------------------------------------------------------------------ vetting

    def upload_benign(
        self, benign: Source, *, task: str | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> str:
        """Uploads a benign dataset ``.npz`` (path or bytes) once; returns its id for ``vet``."""
        data = _read_source(benign, what="benign dataset")
        header = pb.UploadBenignSetHeader(
            task=_task_value(task) if task else pb.TASK_UNSPECIFIED,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
        )

        def requests() -> Iterator[pb.UploadBenignSetRequest]:
            yield pb.UploadBenignSetRequest(header=header)
            for c in _chunks(data, chunk_size):
                yield pb.UploadBenignSetRequest(chunk=c)

        resp = self._call(self._stub.UploadBenignSet, requests())
        return str(resp.benign_set_id)

    def submit(
        self,
        model: Source,
        benign: Source | None = None,
        *,
        benign_set_id: str | None = None,
        name: str,
        version: str,
        task: str,
        profile: str | None = None,
        references: Iterable[str | tuple[str, str]] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> VetTicket:
        """Like ``vet`` but returns the whole ``VetModel`` answer (scan id, state, reused)."""
        if (benign is None) == (benign_set_id is None):
            raise GuardError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "pass exactly one of a benign dataset (path or bytes) and benign_set_id",
            )
        if chunk_size <= 0:
            raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, f"chunk_size must be positive, got {chunk_size}")
        model_bytes = _read_source(model, what="model")
        benign_bytes = None if benign is None else _read_source(benign, what="benign dataset")
        refs = [
            pb.ModelRef(name=r[0], version=r[1]) if isinstance(r, tuple) else pb.ModelRef(name=name, version=r)
            for r in references
        ]
        header = pb.VetModelHeader(
            name=name,
            version=version,
            task=_task_value(task),
            sha256=hashlib.sha256(model_bytes).hexdigest(),
            model_size=len(model_bytes),
            profile=profile or "",
            references=refs,
            benign_set_id=benign_set_id or "",
            benign_sha256=hashlib.sha256(benign_bytes).hexdigest() if benign_bytes is not None else "",
        )

        def requests() -> Iterator[pb.VetModelRequest]:
            yield pb.VetModelRequest(header=header)
            for c in _chunks(model_bytes, chunk_size):
                yield pb.VetModelRequest(model_chunk=c)
            if benign_bytes is not None:
                for c in _chunks(benign_bytes, chunk_size):
                    yield pb.VetModelRequest(benign_chunk=c)

        r = self._call(self._stub.VetModel, requests())
        return VetTicket(
            scan_id=r.scan_id,
            name=r.name or name,
            version=r.version or version,
            state=_state_name(r.state),
            reused=bool(r.reused),
            message=r.message,
        )

    def vet(
        self,
        model: Source,
        benign: Source | None = None,
        *,
        benign_set_id: str | None = None,
        name: str,
        version: str,
        task: str,
        profile: str | None = None,
        references: Iterable[str | tuple[str, str]] = (),
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> str:
        """Uploads one model version (and its benign set) for vetting; returns the scan id at once.

        Args:
            model: the ONNX file (path or bytes); streamed in ``chunk_size`` pieces with its sha256.
            benign: the benign dataset ``.npz`` (path or bytes), or None when ``benign_set_id`` is given.
            benign_set_id: the id ``upload_benign`` returned.
            name, version, task: the model's name, new version and task (``gaze`` or ``headpose``).
            profile: scan profile (the server's default when None).
            references: previously admitted benign versions (of ``name``, or ``(name, version)`` pairs)
                for profiles that use reference models.
        """
        return self.submit(
            model, benign, benign_set_id=benign_set_id, name=name, version=version, task=task,
            profile=profile, references=references, chunk_size=chunk_size,
        ).scan_id

    def watch(self, scan_id: str) -> Iterator[ScanEvent]:
        """Yields the scan's progress events until (and including) its final event."""
        try:
            for e in self._stub.WatchScan(pb.WatchScanRequest(scan_id=scan_id), metadata=self._metadata):
                ev = event_from_proto(e)
                yield ev
                if e.final:
                    return
        except grpc.RpcError as exc:
            raise GuardError.from_rpc(exc) from None

    def get_scan(self, scan_id: str) -> ScanInfo:
        """The full record of one scan, with the engine's reports as dicts."""
        return scan_from_proto(self._call(self._stub.GetScan, pb.GetScanRequest(scan_id=scan_id)).scan)

    def cancel(self, scan_id: str) -> str:
        """Cancels a queued or running scan; returns its state afterwards."""
        return _state_name(self._call(self._stub.CancelScan, pb.CancelScanRequest(scan_id=scan_id)).state)

    def list_models(self, name: str | None = None) -> list[ModelVersionInfo]:
        """Every version of every model (or of ``name``), in submission order per model."""
        resp = self._call(self._stub.ListModels, pb.ListModelsRequest(name=name or ""))
        out: list[ModelVersionInfo] = []
        for m in resp.models:
            for v in m.versions:
                served = bool(v.served) or (m.served_version != "" and v.version == m.served_version)
                out.append(
                    ModelVersionInfo(
                        name=m.name,
                        version=v.version,
                        task=_TASK_NAMES.get(m.task, ""),
                        state=_state_name(v.state),
                        verdict=_VERDICTS.get(v.verdict),
                        reason=v.reason,
                        sha256=v.sha256,
                        served=served,
                        mitigated=bool(v.mitigated),
                        parent=v.parent_version or None,
                        scan_id=v.scan_id,
                        pinned=served and bool(m.pinned),
                        provider=m.provider if served else "",
                        input_shape=tuple(int(s) for s in v.input_shape),
                        output_dim=int(v.output_dim),
                    )
                )
        return out

    def served_version(self, name: str) -> tuple[str | None, bool]:
        """The version ``name`` serves now (None if none) and whether it is pinned."""
        resp = self._call(self._stub.ListModels, pb.ListModelsRequest(name=name))
        for m in resp.models:
            if m.name == name:
                return (m.served_version or None), bool(m.pinned)
        return None, False

    def wait_admission(
        self,
        scan_id: str,
        *,
        on_event: Callable[[ScanEvent], None] | None = None,
        serve_timeout: float = 60.0,
        reused: bool = False,
    ) -> Admission:
        """Follows a scan to its final state and, when a version was admitted, until it is served.

        A newly admitted version is served once the server has loaded it and answered a warm-up
        inference; this waits for that (up to ``serve_timeout`` seconds) unless a pin keeps another
        version served.
        """
        for ev in self.watch(scan_id):
            if on_event is not None:
                on_event(ev)
        info = self.get_scan(scan_id)
        served, pinned = self.served_version(info.name)
        if info.state == "ADMITTED" and info.admitted_version and not pinned:
            deadline = time.monotonic() + serve_timeout
            while served != info.admitted_version and time.monotonic() < deadline:
                time.sleep(0.2)
                served, pinned = self.served_version(info.name)
                if pinned:
                    break
        return Admission(
            scan_id=info.scan_id,
            name=info.name,
            submitted_version=info.version,
            state=info.state,
            verdict=info.verdict,
            perturbation_ratio=info.perturbation_ratio,
            mitigated=info.mitigated,
            admitted_version=info.admitted_version,
            version=served,
            serving=served is not None and served == info.admitted_version,
            reason=info.reason,
            reused=reused or info.reused_from is not None,
            clean_error_before=info.clean_error_before,
            clean_error_after=info.clean_error_after,
        )

    # ---------------------------------------------------------------------------------- inference

    def predict_ex(self, name: str, images: np.ndarray, version: str | None = None) -> Prediction:
        """Like ``predict`` but also says which version answered."""
        try:
            batch = check_images(images)
        except ValueError as exc:
            raise GuardError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        req = pb.PredictRequest(name=name, version=version or "", input=_array_to_tensor(batch))
        resp = self._call(self._stub.Predict, req)
        return Prediction(outputs=_tensor_to_array(resp.output), version=resp.version)

    def predict(self, name: str, images: np.ndarray, version: str | None = None) -> np.ndarray:
        """Runs images (N, C, H, W; float32 in [0,1] or uint8) through an admitted version.

        Returns:
            The raw outputs, (N, d) float32, in the model's own order and units.
        """
        return self.predict_ex(name, images, version).outputs  # type: ignore[no-any-return]

    # -------------------------------------------------------------------------------------- admin

    def pin(self, name: str, version: str) -> str:
        """Serves and pins an admitted version (an empty version unpins); returns the served version."""
        return str(self._call(self._stub.PinVersion, pb.PinVersionRequest(name=name, version=version)).served_version)

    def rollback(self, name: str) -> str:
        """Serves the previously served admitted version again (and pins it); returns it."""
        return str(self._call(self._stub.Rollback, pb.RollbackRequest(name=name)).served_version)

    def health(self, service: str = "") -> str:
        """``grpc.health.v1`` status of ``service`` ("" = the server): SERVING, NOT_SERVING, ..."""
        raw = self._call(self._health, _encode_health_request(service))
        return _HEALTH_STATUS.get(_decode_health_response(raw), "UNKNOWN")
