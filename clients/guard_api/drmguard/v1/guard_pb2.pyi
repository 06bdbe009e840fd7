from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_GAZE: _ClassVar[Task]
    TASK_HEADPOSE: _ClassVar[Task]

class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATE_UNSPECIFIED: _ClassVar[State]
    STATE_RECEIVED: _ClassVar[State]
    STATE_QUEUED: _ClassVar[State]
    STATE_SCANNING: _ClassVar[State]
    STATE_MITIGATING: _ClassVar[State]
    STATE_ADMITTED: _ClassVar[State]
    STATE_REJECTED: _ClassVar[State]
    STATE_FAILED: _ClassVar[State]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_BENIGN: _ClassVar[Verdict]
    VERDICT_BACKDOORED: _ClassVar[Verdict]

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    DATA_TYPE_FLOAT32: _ClassVar[DataType]
    DATA_TYPE_UINT8: _ClassVar[DataType]
TASK_UNSPECIFIED: Task
TASK_GAZE: Task
TASK_HEADPOSE: Task
STATE_UNSPECIFIED: State
STATE_RECEIVED: State
STATE_QUEUED: State
STATE_SCANNING: State
STATE_MITIGATING: State
STATE_ADMITTED: State
STATE_REJECTED: State
STATE_FAILED: State
VERDICT_UNSPECIFIED: Verdict
VERDICT_BENIGN: Verdict
VERDICT_BACKDOORED: Verdict
DATA_TYPE_UNSPECIFIED: DataType
DATA_TYPE_FLOAT32: DataType
DATA_TYPE_UINT8: DataType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class VetModelHeader(_message.Message):
    __slots__ = ("name", "version", "task", "sha256", "model_size", "profile", "references", "benign_set_id", "benign_sha256")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    BENIGN_SET_ID_FIELD_NUMBER: _ClassVar[int]
    BENIGN_SHA256_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    task: Task
    sha256: str
    model_size: int
    profile: str
    references: _containers.RepeatedCompositeFieldContainer[ModelRef]
    benign_set_id: str
    benign_sha256: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., sha256: _Optional[str] = ..., model_size: _Optional[int] = ..., profile: _Optional[str] = ..., references: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., benign_set_id: _Optional[str] = ..., benign_sha256: _Optional[str] = ...) -> None: ...

class VetModelRequest(_message.Message):
    __slots__ = ("header", "model_chunk", "benign_chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    MODEL_CHUNK_FIELD_NUMBER: _ClassVar[int]
    BENIGN_CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: VetModelHeader
    model_chunk: bytes
    benign_chunk: bytes
    def __init__(self, header: _Optional[_Union[VetModelHeader, _Mapping]] = ..., model_chunk: _Optional[bytes] = ..., benign_chunk: _Optional[bytes] = ...) -> None: ...

class VetModelResponse(_message.Message):
    __slots__ = ("scan_id", "name", "version", "state", "reused", "message")
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    name: str
    version: str
    state: State
    reused: bool
    message: str
    def __init__(self, scan_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., reused: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class UploadBenignSetHeader(_message.Message):
    __slots__ = ("task", "sha256", "size")
    TASK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    task: Task
    sha256: str
    size: int
    def __init__(self, task: _Optional[_Union[Task, str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class UploadBenignSetRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadBenignSetHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadBenignSetHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadBenignSetResponse(_message.Message):
    __slots__ = ("benign_set_id", "num_images", "image_shape", "has_labels")
    BENIGN_SET_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SHAPE_FIELD_NUMBER: _ClassVar[int]
    HAS_LABELS_FIELD_NUMBER: _ClassVar[int]
    benign_set_id: str
    num_images: int
    image_shape: _containers.RepeatedScalarFieldContainer[int]
    has_labels: bool
    def __init__(self, benign_set_id: _Optional[str] = ..., num_images: _Optional[int] = ..., image_shape: _Optional[_Iterable[int]] = ..., has_labels: _Optional[bool] = ...) -> None: ...

class WatchScanRequest(_message.Message):
    __slots__ = ("scan_id",)
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    def __init__(self, scan_id: _Optional[str] = ...) -> None: ...

class WatchScanResponse(_message.Message):
    __slots__ = ("scan_id", "state", "phase", "step", "total", "losses", "perturbation_ratio", "message", "verdict", "final", "admitted_version", "mitigated", "timestamp")
    class LossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    MITIGATED_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    state: State
    phase: str
    step: int
    total: int
    losses: _containers.ScalarMap[str, float]
    perturbation_ratio: float
    message: str
    verdict: Verdict
    final: bool
    admitted_version: str
    mitigated: bool
    timestamp: float
    def __init__(self, scan_id: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., phase: _Optional[str] = ..., step: _Optional[int] = ..., total: _Optional[int] = ..., losses: _Optional[_Mapping[str, float]] = ..., perturbation_ratio: _Optional[float] = ..., message: _Optional[str] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., final: _Optional[bool] = ..., admitted_version: _Optional[str] = ..., mitigated: _Optional[bool] = ..., timestamp: _Optional[float] = ...) -> None: ...

class GetScanRequest(_message.Message):
    __slots__ = ("scan_id",)
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    def __init__(self, scan_id: _Optional[str] = ...) -> None: ...

class Scan(_message.Message):
    __slots__ = ("scan_id", "name", "version", "task", "sha256", "profile", "state", "verdict", "reason", "perturbation_ratio", "mitigated", "admitted_version", "report_json", "mitigation_report_json", "rescan_report_json", "clean_error_before", "clean_error_after", "benign_set_id", "created_at", "updated_at", "reused_from", "references")
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PERTURBATION_RATIO_FIELD_NUMBER: _ClassVar[int]
    MITIGATED_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    MITIGATION_REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    RESCAN_REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ERROR_BEFORE_FIELD_NUMBER: _ClassVar[int]
    CLEAN_ERROR_AFTER_FIELD_NUMBER: _ClassVar[int]
    BENIGN_SET_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REUSED_FROM_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    name: str
    version: str
    task: Task
    sha256: str
    profile: str
    state: State
    verdict: Verdict
    reason: str
    perturbation_ratio: float
    mitigated: bool
    admitted_version: str
    report_json: str
    mitigation_report_json: str
    rescan_report_json: str
    clean_error_before: float
    clean_error_after: float
    benign_set_id: str
    created_at: float
    updated_at: float
    reused_from: str
    references: _containers.RepeatedCompositeFieldContainer[ModelRef]
    def __init__(self, scan_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., sha256: _Optional[str] = ..., profile: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., reason: _Optional[str] = ..., perturbation_ratio: _Optional[float] = ..., mitigated: _Optional[bool] = ..., admitted_version: _Optional[str] = ..., report_json: _Optional[str] = ..., mitigation_report_json: _Optional[str] = ..., rescan_report_json: _Optional[str] = ..., clean_error_before: _Optional[float] = ..., clean_error_after: _Optional[float] = ..., benign_set_id: _Optional[str] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., reused_from: _Optional[str] = ..., references: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ...) -> None: ...

class GetScanResponse(_message.Message):
    __slots__ = ("scan",)
    SCAN_FIELD_NUMBER: _ClassVar[int]
    scan: Scan
    def __init__(self, scan: _Optional[_Union[Scan, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("version", "state", "verdict", "reason", "sha256", "mitigated", "parent_version", "scan_id", "served", "created_at", "input_shape", "input_name", "output_name", "output_dim")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MITIGATED_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIM_FIELD_NUMBER: _ClassVar[int]
    version: str
    state: State
    verdict: Verdict
    reason: str
    sha256: str
    mitigated: bool
    parent_version: str
    scan_id: str
    served: bool
    created_at: float
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    input_name: str
    output_name: str
    output_dim: int
    def __init__(self, version: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ..., verdict: _Optional[_Union[Verdict, str]] = ..., reason: _Optional[str] = ..., sha256: _Optional[str] = ..., mitigated: _Optional[bool] = ..., parent_version: _Optional[str] = ..., scan_id: _Optional[str] = ..., served: _Optional[bool] = ..., created_at: _Optional[float] = ..., input_shape: _Optional[_Iterable[int]] = ..., input_name: _Optional[str] = ..., output_name: _Optional[str] = ..., output_dim: _Optional[int] = ...) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "task", "served_version", "pinned", "versions", "provider")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: Task
    served_version: str
    pinned: bool
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    provider: str
    def __init__(self, name: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., served_version: _Optional[str] = ..., pinned: _Optional[bool] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., provider: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("name", "version", "input")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    input: Tensor
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("name", "version", "output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    output: Tensor
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., output: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PinVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class PinVersionResponse(_message.Message):
    __slots__ = ("name", "served_version", "previous_version", "pinned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    served_version: str
    previous_version: str
    pinned: bool
    def __init__(self, name: _Optional[str] = ..., served_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("name", "served_version", "previous_version", "pinned")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SERVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    name: str
    served_version: str
    previous_version: str
    pinned: bool
    def __init__(self, name: _Optional[str] = ..., served_version: _Optional[str] = ..., previous_version: _Optional[str] = ..., pinned: _Optional[bool] = ...) -> None: ...

class CancelScanRequest(_message.Message):
    __slots__ = ("scan_id",)
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    def __init__(self, scan_id: _Optional[str] = ...) -> None: ...

class CancelScanResponse(_message.Message):
    __slots__ = ("scan_id", "state")
    SCAN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    scan_id: str
    state: State
    def __init__(self, scan_id: _Optional[str] = ..., state: _Optional[_Union[State, str]] = ...) -> None: ...
