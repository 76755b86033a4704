"""The typed job spec: what one accepted job asks for, as it travels HTTP layer -> store -> worker.

File names are the server's own (chosen by ``uploads.store_upload``), relative to the job's
``inputs/`` folder; no client-chosen name or server path is ever part of a spec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ..model.sampling import SamplingParameters


@dataclass(frozen=True)
class PacsSource:
    """Edit mode from a PACS: where the image came from (shown in the job view as it is)."""

    source: str
    study: str
    series: str
    instance: Optional[str] = None


@dataclass(frozen=True)
class BatchMember:
    """A job that is one row of a batch (``routes_batches.py``): which batch and row, and its quality check."""

    batch_id: str
    row: int  # where the row starts in its manifest
    name: str  # the row's result name (images/<name>/ in the batch's dataset)
    quality_check: bool = True  # the shipped segmenter's Dice into provenance["quality"] (batch/quality.py)
    min_dice: Optional[float] = None  # refuse (drop) an image below it


@dataclass(frozen=True)
class JobSpec:
    """One job: its stored input files, resolved sampling parameters and what to do with the result."""

    anatomy: Optional[str]  # anatomy label map file name (None in edit mode without one)
    pathologies: tuple[tuple[str, str], ...]  # (mask file name, finding); '' removes a finding in edit mode
    image: Optional[str]  # edit mode: the X-ray to edit
    parameters: SamplingParameters
    mode: str  # "generate" or "edit"
    expected_steps: int  # diffusion steps over all stages, for progress and ETA
    push_to: Optional[str] = None  # a configured PACS destination for the result
    source: Optional[PacsSource] = None
    batch: Optional[BatchMember] = None  # set with dataclasses.replace after build
    # (control name, stored file name or None for lungs, scale or None = the model's): ControlNets to steer with
    controls: tuple[tuple[str, Optional[str], Optional[float]], ...] = ()

    @classmethod
    def build(cls, *, anatomy: Optional[str], pathologies, image: Optional[str], parameters: SamplingParameters,
              push_to: Optional[str] = None, source: Optional[PacsSource] = None, controls=()) -> "JobSpec":
        """A spec whose mode and step count follow from its inputs: one stage per region, plus anatomy."""
        pathologies = tuple((name, finding) for name, finding in pathologies)
        edit = image is not None
        stages = len(pathologies) + (0 if edit else 1)
        return cls(anatomy=anatomy, pathologies=pathologies, image=image, parameters=parameters,
                   mode="edit" if edit else "generate", expected_steps=stages * parameters.num_inference_steps,
                   push_to=push_to or None, source=source,
                   controls=tuple((name, file, scale) for name, file, scale in controls))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "JobSpec":
        data = json.loads(text)
        source = data.get("source")
        batch = data.get("batch")
        return cls(batch=BatchMember(**batch) if batch else None,
                   anatomy=data.get("anatomy"),
                   pathologies=tuple((name, finding) for name, finding in data.get("pathologies", ())),
                   image=data.get("image"), parameters=SamplingParameters(**data["parameters"]),
                   mode=data["mode"], expected_steps=int(data.get("expected_steps") or 0),
                   push_to=data.get("push_to"), source=PacsSource(**source) if source else None,
                   controls=tuple((name, file, scale) for name, file, scale in data.get("controls", ())))


def generation_request(spec: JobSpec, inputs_dir: Path):
    """The ``generate.GenerationRequest`` of a spec whose files are in ``inputs_dir``."""
    from ..control_spec import ControlRequest
    from ..generate import GenerationRequest

    return GenerationRequest(
        anatomy_path=inputs_dir / spec.anatomy if spec.anatomy else None,
        pathologies=[(inputs_dir / name, finding) for name, finding in spec.pathologies],
        image_path=inputs_dir / spec.image if spec.image else None,
        seed=spec.parameters.seed,
        sampling=spec.parameters.to_public(),
        controls=[ControlRequest(name, inputs_dir / file if file else None, scale) for name, file, scale in spec.controls],
    )


def prepare_job(spec: JobSpec, inputs_dir: Path, model_info):
    """Read and validate the spec's inputs without the model (XRealError if unusable).

    Returns (the spec with canonical finding names and checked parameters, the PreparedRequest).
    """
    from ..generate import prepare_request

    prepared = prepare_request(generation_request(spec, inputs_dir), model_info)
    checked = JobSpec.build(
        anatomy=spec.anatomy, image=spec.image, parameters=prepared.parameters, push_to=spec.push_to,
        source=spec.source,
        controls=[(name, file, control.scale)  # the scales the job runs at (the model's default filled in)
                  for (name, file, _), control in zip(spec.controls, prepared.controls)],
        pathologies=[(name, region.finding)  # canonical finding names, as in provenance
                     for (name, _), region in zip(spec.pathologies, prepared.pathologies)])
    return checked, prepared
