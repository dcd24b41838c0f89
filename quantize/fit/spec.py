"""The ``exports.gguf.fit`` recipe key and the ``exports.gguf.fitted`` record that ``fit`` writes."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from quantize.fit.budget import parse_budget
from quantize.fit.devices import DEVICES


class FitSpec(BaseModel):
    """Choose every text tensor group's GGUF type by measurement, for a budget: ``budget`` (bytes
    like ``3.5GB`` or bits per weight like ``4.5bpw``) or ``device`` (a profile) with ``context``
    tokens and ``vision`` (the mmproj shares the memory)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget: str | None = None
    device: str | None = None
    context: int = Field(4096, ge=1)
    vision: bool = False
    probe: str = "Q4_0"  # the GGUF type each group is probed at in transformers (sensitivity = KL / weight error)
    samples: int = Field(8, ge=1)  # probe on the first N of the recipe's calibration text samples
    # "gradient": a Fisher estimate of each decoder-layer group's KL from sampled output gradients,
    # true KL for the token tables; "group": true KL per group (several times the probe time)
    probes: Literal["gradient", "group"] = "gradient"

    @model_validator(mode="after")
    def _one(self):
        from quantize.errors import RecipeError
        from quantize.fit.measure import probe_types

        if (self.budget is None) == (self.device is None):
            raise ValueError("fit: give exactly one of 'budget' (e.g. 3.5GB, 4.5bpw) or 'device' "
                             f"(valid: {', '.join(DEVICES)})")
        if self.budget is not None:  # a budget is the text GGUF's size: no memory to share
            unread = [k for k in ("context", "vision") if getattr(self, k) != type(self).model_fields[k].default]
            if unread:
                raise ValueError(f"fit: {' and '.join(unread)} go with 'device' (they size what shares its "
                                 f"memory); a 'budget' is the text GGUF's own size")
        if self.device is not None and self.device not in DEVICES:
            raise ValueError(f"fit.device: unknown device profile {self.device!r}; valid: {', '.join(DEVICES)}")
        if self.budget is not None:
            try:
                parse_budget(self.budget, "fit.budget")
            except RecipeError as e:
                raise ValueError(str(e)) from None
        if self.probe not in probe_types():
            raise ValueError(f"fit.probe: {self.probe!r} cannot be probed; valid: {', '.join(probe_types())}")
        return self


class FitRecord(BaseModel):
    """What ``fit`` predicted for the allocation in ``tensor_types`` (informational: the run
    records it in the manifest and GGUF metadata; editing tensor_types makes it stale)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_bytes: int
    predicted_kl: float | None  # None: the budget held every group at its largest type, nothing was measured
    basis: str
