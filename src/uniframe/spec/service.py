"""``kind: InferenceService``: one model served over OIP v2, built into an image by uniframe.

The spec names *what* to serve and *how much* of it; everything about *how*
(which kernel options, which files in the image) is the builder's job. The
few build options here (``kernel``, ``image.rootfs``, ``image.compression``)
exist for users who must pin them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Discriminator,
    Field,
    PlainValidator,
    Tag,
    ValidationError,
    model_validator,
)

from uniframe.spec.common import (
    BaseSpec,
    EnvVars,
    LocalPath,
    Port,
    Resources,
    Runtime,
    Size,
    StrictModel,
    UrlPath,
)
from uniframe.spec.units import parse_count_or_percent, parse_duration, parse_percent

ModelFormat = Literal["onnx", "sklearn"]
"""``sklearn`` is a pickled or joblib-dumped estimator, converted to ONNX at build time."""

_FORMAT_BY_SUFFIX: dict[str, ModelFormat] = {
    ".onnx": "onnx", ".pkl": "sklearn", ".pickle": "sklearn", ".joblib": "sklearn",
}
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _model_name(value: str) -> str:
    if not _MODEL_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a model name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return value


def _model_version(value: object) -> int | str:
    """Registry versions are numbers (``3``) or labels (``"2024-05"``); a YAML float is a typo."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"{value} is not a version: versions start at 1")
        return value
    if isinstance(value, str) and _MODEL_NAME.fullmatch(value):
        return value
    if isinstance(value, float):
        raise ValueError(
            f"{value} is not a version: YAML read a decimal number; use a whole number, "
            "or quote the version as text (e.g. version: '1.10')"
        )
    raise ValueError(f"{value!r} is not a version: use a whole number (3) or a label ('2024-05')")


class RegistryModel(StrictModel):
    """A model from the model registry, pinned to one version so a rebuild gives the same image."""

    name: Annotated[str, AfterValidator(_model_name)]
    version: Annotated[int | str, PlainValidator(_model_version)]
    format: ModelFormat | None = Field(
        default=None, description="the registry records it; give it only to insist"
    )


def _local_model(value: object) -> object:
    if isinstance(value, str):
        if value.startswith("file://"):
            return value.removeprefix("file://")
        if "://" in value:
            raise ValueError(
                f"{value!r}: only local model files are supported; download it and use "
                "uri: ./model.onnx, or use a registry model {name, version}"
            )
    return value


class FileModel(StrictModel):
    """A model file next to the spec; the builder copies it into the image."""

    uri: Annotated[LocalPath, BeforeValidator(_local_model)] = Field(
        description="a model file, relative to the spec file, e.g. ./iris.onnx"
    )
    format: ModelFormat = "onnx"

    @model_validator(mode="before")
    @classmethod
    def _format_from_suffix(cls, data: Any) -> Any:
        if isinstance(data, dict) and "format" not in data and isinstance(data.get("uri"), str):
            suffix = Path(data["uri"]).suffix.lower()
            if suffix not in _FORMAT_BY_SUFFIX:
                raise ValueError(
                    f"cannot tell the format of {data['uri']!r} from its name; "
                    "add format: onnx or format: sklearn"
                )
            data = {**data, "format": _FORMAT_BY_SUFFIX[suffix]}
        return data


def _model_kind(value: Any) -> str | None:
    if isinstance(value, FileModel):
        return "file"
    if isinstance(value, RegistryModel):
        return "registry"
    if isinstance(value, dict):
        return "file" if "uri" in value else "registry"
    return None


def _model_shorthand(value: Any) -> Any:
    """Accept ``iris@3`` for ``{name: iris, version: 3}`` and catch the likely mix-ups early."""
    if isinstance(value, str):
        name, at, version = value.rpartition("@")
        if at and name and version:
            return {"name": name, "version": int(version) if version.isdigit() else version}
        if "/" in value or Path(value).suffix.lower() in _FORMAT_BY_SUFFIX:
            raise ValueError(f"{value!r} looks like a file; write model: {{uri: {value}}}")
        raise ValueError(
            f"{value!r} has no version; write name@version (e.g. {value}@1), "
            "{name, version} or {uri: ./model.onnx}"
        )
    if isinstance(value, dict) and "uri" in value and "name" in value:
        raise ValueError(
            "give either uri (a local file) or name and version (a registry model), not both"
        )
    return value


ModelRef = Annotated[
    Annotated[RegistryModel, Tag("registry")] | Annotated[FileModel, Tag("file")],
    Discriminator(
        _model_kind,
        custom_error_type="model_ref",
        custom_error_message=(
            "expected a model: {uri: ./model.onnx}, {name: iris, version: 3} or iris@3"
        ),
    ),
    BeforeValidator(_model_shorthand),
]


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds; written in YAML as ``30s``, ``1m30s``, ``500ms`` or a plain number of seconds."""

DEFAULT_TARGET = {"concurrency": 4.0, "rps": 200.0}
"""Per replica, when ``target`` is left out: 4 requests in flight (the model server answers one
at a time, so 4 is a short queue), or Knative's 200 requests a second."""
STABLE_WINDOW_BOUNDS = (6.0, 3600.0)  # Knative's bounds: shorter is noise, longer never reacts
PANIC_THRESHOLD_BOUNDS = (110.0, 1000.0)  # Knative's bounds, in percent
MIN_PANIC_WINDOW = 1.0  # the daemon samples about once a second: a shorter window sees nothing


def _window(value: object) -> float | str:
    """``panicWindow``: a duration, or a share of ``stableWindow`` written ``"10%"``."""
    if isinstance(value, str) and value.strip().endswith("%"):
        share = parse_percent(value)
        if not 0 < share <= 100:
            raise ValueError(f"{value!r}: a share of stableWindow is above 0% and at most 100%")
        return f"{share:g}%"
    return parse_duration(value)


def _stable_window(value: object) -> float:
    seconds = parse_duration(value)
    low, high = STABLE_WINDOW_BOUNDS
    if not low <= seconds <= high:
        raise ValueError(f"{value!r} is outside {low:g}s to {high / 3600:g}h: a shorter window "
                         "averages noise, a longer one hardly reacts")
    return seconds


def _panic_threshold(value: object) -> float:
    percent = parse_percent(value)
    low, high = PANIC_THRESHOLD_BOUNDS
    if not low <= percent <= high:
        raise ValueError(f"{value!r} is outside {low:g}% to {high:g}%: panicThreshold is a share "
                         "of the ready replicas, e.g. 200% (panic when the burst wants twice them)")
    return percent


class Autoscaling(StrictModel):
    """Scale on load with Knative's KPA rules; ``min: 0`` lets an idle service sleep.

    The daemon samples the service endpoint about once a second: requests in flight
    (``metric: concurrency``, held requests included) or answered per second
    (``metric: rps``), averaged over ``stableWindow`` and over the shorter
    ``panicWindow``. Desired replicas are ``ceil(average / target)``; when the panic
    window asks for ``panicThreshold`` of the ready replicas or more, the service
    panics: it follows the panic window and never scales down until a stable window
    passes without that. A service idle for a whole stable window goes to one replica,
    and to zero (if ``min`` is 0) after ``scaleToZeroGracePeriod`` more.
    """

    min: int = Field(default=0, ge=0, description="the fewest replicas; 0 lets an idle service sleep")
    max: int = Field(ge=1, description="the most replicas to run, e.g. max: 4")
    metric: Literal["concurrency", "rps"] = Field(
        default="concurrency",
        description="concurrency: requests in flight per replica; rps: requests a second per replica")
    target: float | None = Field(
        default=None, gt=0,
        description="the metric's value per replica to aim for (default 4 for concurrency, 200 for rps)")
    target_concurrency: float | None = Field(
        default=None, gt=0, description="older spelling of metric: concurrency with target")
    scale_to_zero_grace_period: Duration = Field(
        default=30.0, ge=0,
        description="how long the last replica stays once a stable window saw no request")
    stable_window: Annotated[float, BeforeValidator(_stable_window)] = Field(
        default=60.0, description="the window the metric is averaged over (6s to 1h)")
    panic_window: Annotated[float | str, BeforeValidator(_window)] = Field(
        default="10%", description="the short window that detects bursts: a duration or a share "
                                   "of stableWindow (default 10%, at least 1s)")
    panic_threshold: Annotated[float, BeforeValidator(_panic_threshold)] = Field(
        default=200.0, description="panic when the panic window wants this share of the ready replicas "
                    "(110% to 1000%)")
    activation_timeout: Duration = Field(
        default=30.0, gt=0,
        description="how long the endpoint holds a request while no replica is ready, then 503")

    @property
    def target_value(self) -> float:
        """The metric's value per replica to aim for, whichever way it was written."""
        if self.target is not None:
            return self.target
        if self.target_concurrency is not None:
            return self.target_concurrency
        return DEFAULT_TARGET[self.metric]

    @property
    def panic_window_seconds(self) -> float:
        """``panicWindow`` in seconds (a share is of ``stableWindow``), at least one sample apart."""
        if isinstance(self.panic_window, str):
            share = float(self.panic_window.removesuffix("%"))
            return max(MIN_PANIC_WINDOW, self.stable_window * share / 100)
        return self.panic_window

    @model_validator(mode="after")
    def _consistent(self) -> Autoscaling:
        def fail(field: str, value: object, message: str) -> ValidationError:
            # Raised as a ValidationError so the error names the field, not spec.autoscaling.
            return ValidationError.from_exception_data(type(self).__name__, [
                {"type": "value_error", "loc": (field,), "input": value,
                 "ctx": {"error": ValueError(message)}}])

        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max}); lower min or raise max")
        if self.target_concurrency is not None and (self.target is not None
                                                    or self.metric != "concurrency"):
            raise fail("targetConcurrency", self.target_concurrency,
                       "targetConcurrency is the older spelling of metric: concurrency with "
                       "target; give target (and metric) only")
        if not isinstance(self.panic_window, str):
            if self.panic_window < MIN_PANIC_WINDOW:
                raise fail("panicWindow", self.panic_window,
                           f"{self.panic_window:g}s is shorter than the daemon's sampling period; "
                           f"use at least {MIN_PANIC_WINDOW:g}s")
            if self.panic_window > self.stable_window:
                raise fail("panicWindow", self.panic_window,
                           f"{self.panic_window:g}s is longer than stableWindow "
                           f"({self.stable_window:g}s); a panic window is the short one")
        return self


CountOrPercent = Annotated[int | str, PlainValidator(parse_count_or_percent)]


class Canary(StrictModel):
    traffic_percent: int = Field(ge=0, le=100, description="share of requests for the new version")


class Rollout(StrictModel):
    strategy: Literal["rolling", "canary"] = "rolling"
    max_surge: CountOrPercent = 1
    max_unavailable: CountOrPercent = 0
    canary: Canary | None = None
    progress_deadline_seconds: float = Field(
        default=300, gt=0,
        description="a new replica not ready this long after it was created fails the rollout, "
                    "which then rolls back by itself")

    @model_validator(mode="after")
    def _consistent(self) -> Rollout:
        if self.max_surge in (0, "0%") and self.max_unavailable in (0, "0%"):
            raise ValueError(
                "maxSurge and maxUnavailable are both 0, so no replica could ever be replaced; "
                "raise one of them"
            )
        if self.strategy == "canary" and self.canary is None:
            raise ValueError("strategy canary needs canary: {trafficPercent: 10} (any 0..100)")
        if self.strategy != "canary" and self.canary is not None:
            raise ValueError("canary settings apply only with strategy: canary")
        return self


class ServiceHealthCheck(StrictModel):
    path: UrlPath = "/v2/health/ready"
    period_seconds: float = Field(default=10, gt=0)
    timeout_seconds: float = Field(default=1, gt=0)
    failure_threshold: int = Field(default=3, ge=1)


MiB = 1024**2
SERVER_RESERVE = 96 * MiB
"""Replica memory that is not a request's: the server at rest with a small model measures
59 MiB RSS (Python, numpy, ONNX Runtime, orjson); the rest is the guest kernel, page
cache and allocator slack."""
MODEL_FACTOR = 2
"""A model's weights stay in memory once and twice while ONNX Runtime loads them: a 38 MiB
MatMul model measured +39 MiB at rest and +76 MiB at the start-up peak, which must fit too."""
PEAK_FACTOR = 6
"""A request's peak memory over the server at rest, in body limits: the server's own
bound (``uniframe.serve.memory.PEAK_FACTOR``; tests/serve/test_memory.py holds them equal
and measures it)."""
DEFAULT_MAX_BODY_CEILING = 64 * MiB
"""The derived limit never exceeds this however large the replica: bigger bodies are asked for."""
MIN_MAX_BODY = 1 * MiB
"""A replica that cannot take a 1 MiB body cannot serve ordinary requests either."""


def _mib(n: int) -> str:
    return f"{n // MiB}Mi" if n % MiB == 0 else f"{n / MiB:.1f}Mi"


class BodyLimitError(ValueError):
    """A body limit, asked for or derived, that the replica's memory cannot serve."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field  # what to change: "maxBodySize" or "memory"


class Server(StrictModel):
    """Knobs of the model server inside the image (``uniframe.serve``)."""

    threads: int = Field(default=1, ge=1)
    max_body_size: Size | None = Field(
        default=None, gt=0,
        description="the largest request body; unset, the largest that resources.memory "
                    "can serve (26Mi for 256Mi, at most 64Mi); set, it must fit it")

    def body_limit(self, memory: int, model_bytes: int = 0) -> int:
        """The largest request body, in bytes, a replica of ``memory`` bytes can serve.

        Why: a body costs the server up to ``PEAK_FACTOR`` times its size (orjson's
        copy and Python objects of a JSON body; the server refuses JSON that would cost
        more), so a limit that ignores memory lets one legal request kill a replica: a
        64 MiB limit drove a 256 MiB replica to a 916 MiB peak. The rule:
        ``(memory - SERVER_RESERVE - MODEL_FACTOR x model) / PEAK_FACTOR``, in whole
        MiB, at most ``DEFAULT_MAX_BODY_CEILING``; ``maxBodySize`` wins when it fits.
        ``model_bytes`` is the model file's size: the spec does not know it and passes
        0, the builder checks again with it. Raises :class:`BodyLimitError`.
        """
        room = memory - SERVER_RESERVE - MODEL_FACTOR * model_bytes
        fits = max(room, 0) // PEAK_FACTOR
        model = f" and {MODEL_FACTOR}x the {_mib(model_bytes)} model" if model_bytes else ""
        why = (f"a request takes up to {PEAK_FACTOR}x the body limit on top of "
               f"{_mib(SERVER_RESERVE)} for the server{model}")
        if self.max_body_size is not None:
            if self.max_body_size > fits:
                raise BodyLimitError(
                    f"maxBodySize {_mib(self.max_body_size)} does not fit resources.memory "
                    f"{_mib(memory)}: {why}, so at most {_mib(fits // MiB * MiB)} fits; lower "
                    "maxBodySize or raise resources.memory", "maxBodySize")
            return self.max_body_size
        limit = min(DEFAULT_MAX_BODY_CEILING, fits // MiB * MiB)
        if limit < MIN_MAX_BODY:
            need = SERVER_RESERVE + MODEL_FACTOR * model_bytes + PEAK_FACTOR * MIN_MAX_BODY
            raise BodyLimitError(
                f"resources.memory {_mib(memory)} is too small for the model server: {why}, "
                f"and a {_mib(MIN_MAX_BODY)} body must fit; give it at least {_mib(need)}",
                "memory")
        return limit


RootFormat = Literal["squashfs", "initramfs"]
"""How a unikernel image carries its root: a read-only squashfs disk, or an initramfs in RAM."""


class ImageOptions(StrictModel):
    """How the unikernel image is packaged; left out, the builder picks what measured best.

    ``compression`` applies to either root format; unset, it is the fastest
    booting one for the format (bench/README.md, "Unikernel").
    """

    rootfs: RootFormat = "squashfs"
    compression: Literal["none", "gzip", "lz4", "zstd"] = "lz4"


class InferenceServiceSpec(StrictModel):
    model: ModelRef = Field(
        description="add e.g. model: {uri: ./model.onnx} or model: {name: iris, version: 3}"
    )
    runtime: Runtime = "unikernel"
    resources: Resources = Field(default_factory=Resources)
    replicas: int | None = Field(default=None, ge=0)
    autoscaling: Autoscaling | None = None
    rollout: Rollout = Field(default_factory=Rollout)
    port: Port = 8080
    service_port: Port | None = Field(
        default=None,
        description="the stable host port of the service endpoint (default: one chosen once "
                    "and kept)")
    env: EnvVars = Field(default_factory=dict)
    health_check: ServiceHealthCheck = Field(default_factory=ServiceHealthCheck)
    server: Server = Field(default_factory=Server)
    kernel: LocalPath | None = None
    image: ImageOptions = Field(default_factory=ImageOptions)

    @model_validator(mode="after")
    def _scaling(self) -> InferenceServiceSpec:
        """Fixed ``replicas`` and ``autoscaling`` contradict each other; neither means one replica."""
        if self.replicas is not None and self.autoscaling is not None:
            raise ValueError("give either replicas or autoscaling, not both")
        if self.replicas is None and self.autoscaling is None:
            self.replicas = 1
        if self.kernel is not None and self.runtime in ("container", "process"):
            raise ValueError(f"kernel applies to runtimes unikernel and vm, not {self.runtime}")
        return self

    @model_validator(mode="after")
    def _body_fits_memory(self) -> InferenceServiceSpec:
        """A body limit the memory cannot serve would let one legal request kill a replica.

        The model's size is not known here (the builder checks again with it), so this
        catches only what cannot fit whatever the model.
        """
        try:
            self.server.body_limit(self.resources.memory)
        except BodyLimitError as exc:
            # Raised as a ValidationError to point at the field to change, not at spec.
            if exc.field == "maxBodySize":
                loc, value = ("server", "maxBodySize"), self.server.max_body_size
            else:
                loc, value = ("resources", "memory"), self.resources.memory
            raise ValidationError.from_exception_data(type(self).__name__, [
                {"type": "value_error", "loc": loc, "input": value, "ctx": {"error": exc}},
            ]) from None
        return self


class InferenceService(BaseSpec):
    kind: Literal["InferenceService"]
    spec: InferenceServiceSpec = Field(description="add the spec: mapping, with at least model")

    def local_paths(self) -> dict[str, Path]:
        """Files the spec refers to, by field path, for a builder to read or a linter to check."""
        paths: dict[str, Path] = {}
        if isinstance(self.spec.model, FileModel):
            paths["spec.model.uri"] = self.spec.model.uri
        if self.spec.kernel is not None:
            paths["spec.kernel"] = self.spec.kernel
        return paths
