"""The declarative model: what users write in YAML, validated and normalised.

``uniframe.spec`` imports nothing else of ours but :mod:`uniframe.errors`, so
every other layer can depend on it. Typical use::

    from uniframe.spec import load_file, InferenceService

    for doc in load_file("service.yaml"):        # raises SpecError with every problem
        if isinstance(doc.spec, InferenceService):
            print(doc.where, doc.spec.spec.model, doc.digest())
"""

from uniframe.spec.common import API_VERSION, BaseSpec, Metadata, Resources, Runtime
from uniframe.spec.kinds import KINDS, Spec
from uniframe.spec.loader import (
    Document,
    Problem,
    Report,
    check_file,
    check_text,
    load_data,
    load_file,
    load_text,
)
from uniframe.spec.runtimes import RUNTIMES, ImageSource, RuntimeName, runtime_name
from uniframe.spec.service import (
    Autoscaling,
    Canary,
    FileModel,
    ImageOptions,
    InferenceService,
    InferenceServiceSpec,
    ModelFormat,
    RegistryModel,
    Rollout,
    Server,
    ServiceHealthCheck,
)
from uniframe.spec.units import format_size, parse_size
from uniframe.spec.workload import (
    CloudInit,
    HttpCheck,
    PortMapping,
    TcpCheck,
    Workload,
    WorkloadHealthCheck,
    WorkloadSpec,
    image_source,
)

__all__ = [
    "API_VERSION",
    "KINDS",
    "RUNTIMES",
    "Autoscaling",
    "BaseSpec",
    "Canary",
    "CloudInit",
    "Document",
    "FileModel",
    "HttpCheck",
    "ImageOptions",
    "ImageSource",
    "InferenceService",
    "InferenceServiceSpec",
    "Metadata",
    "ModelFormat",
    "PortMapping",
    "Problem",
    "RegistryModel",
    "Report",
    "Resources",
    "Rollout",
    "Runtime",
    "RuntimeName",
    "Server",
    "ServiceHealthCheck",
    "Spec",
    "TcpCheck",
    "Workload",
    "WorkloadHealthCheck",
    "WorkloadSpec",
    "check_file",
    "check_text",
    "format_size",
    "image_source",
    "load_data",
    "load_file",
    "load_text",
    "parse_size",
    "runtime_name",
]
