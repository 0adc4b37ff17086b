"""The kinds a spec document can be, and the union that tells them apart by ``kind``."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from uniframe.spec.service import InferenceService
from uniframe.spec.workload import Workload

Spec = Annotated[InferenceService | Workload, Field(discriminator="kind")]

KINDS: dict[str, type[InferenceService] | type[Workload]] = {
    "InferenceService": InferenceService,
    "Workload": Workload,
}
