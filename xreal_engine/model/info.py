"""Model directories: metadata (``xreal_model.json``), lookup, weights hash, parameter counts, description.

A model directory is a diffusers pipeline directory (``XRealPipeline.save_pretrained``)
plus ``xreal_model.json``, which holds what no diffusers config records: the anatomy
label names, the finding vocabulary, the pixel geometry and the default sampling
settings. Reading the metadata and hashing the weights needs no torch, so the
server and the job validation can describe a model without loading it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from ..control_spec import CONTROL_NAMES, check_scale
from ..errors import InputError, ModelError, shown
from .sampling import XREAL_DEFAULTS, check_model_defaults

MODEL_INFO_FILE = "xreal_model.json"
FORMAT_VERSION = 1
COMPONENTS = ("vae", "anatomy_controller", "unet", "text_encoder", "tokenizer", "scheduler")
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "demo_model"

DEFAULT_ANATOMY_LABELS = {"1": "left lung", "2": "right lung", "3": "heart", "4": "aorta"}
# Optional ControlNets live beside the components as controlnet_<name>/ (diffusers ControlNetModel folders);
# xreal_model.json lists them ("controlnets": {"sobel": {"scale": 1.0}}) with their default scale.
CONTROLNET_PREFIX = "controlnet_"


def missing_controlnet_sentence(name: str, have) -> str:
    """The one sentence for a control whose ControlNet the model lacks."""
    return (f"This model has no {shown(name)} ControlNet (its ControlNets: {', '.join(have) or 'none'}); "
            "give another control or a model that has one.")


def controlnet_folder(name: str) -> str:
    """The folder of control ``name``'s ControlNet inside a model directory."""
    return f"{CONTROLNET_PREFIX}{name}"


@dataclass
class ModelInfo:
    """The contents of ``xreal_model.json`` (see docs/architecture.md)."""

    model_id: str
    image_size: int = 256
    latent_size: int = 64
    scale_factor: float = 0.18215
    description: str = ""
    anatomy_labels: dict = field(default_factory=lambda: dict(DEFAULT_ANATOMY_LABELS))
    label_warnings: dict = field(default_factory=dict)
    findings: list = field(default_factory=list)
    defaults: dict = field(default_factory=lambda: dict(XREAL_DEFAULTS))
    field_of_view_mm: float = 400.0
    format_version: int = FORMAT_VERSION
    controlnets: dict = field(default_factory=dict)  # control name -> default scale (optional ControlNets)

    def __post_init__(self):
        self.validate()

    def validate(self, source: str = "model metadata") -> None:
        """Refuse metadata that the sampler could not honour, naming the field."""

        def fail(problem: str):
            raise ModelError(f"{source}: {problem}.")

        if self.format_version != FORMAT_VERSION:
            fail(f"format_version {self.format_version!r} is not supported (expected {FORMAT_VERSION})")
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            fail("model_id must be a non-empty string")
        for name in ("image_size", "latent_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 4:
                fail(f"{name} must be an integer of at least 4, not {value!r}")
        if self.image_size % self.latent_size:
            fail(f"image_size {self.image_size} is not a multiple of latent_size {self.latent_size}")
        if not isinstance(self.scale_factor, (int, float)) or not self.scale_factor > 0:
            fail(f"scale_factor must be a positive number, not {self.scale_factor!r}")
        if not isinstance(self.anatomy_labels, dict) or not self.anatomy_labels:
            fail("anatomy_labels must be a non-empty mapping of label value to name")
        for key, name in self.anatomy_labels.items():
            if not str(key).isdigit() or not 1 <= int(key) <= 4 or not isinstance(name, str):
                fail(f"anatomy label {key!r} must be a value 1..4 with a name")
        self.anatomy_labels = {str(k): v for k, v in self.anatomy_labels.items()}
        if not isinstance(self.label_warnings, dict):
            fail("label_warnings must be a mapping of label value to a sentence")
        self.label_warnings = {str(k): str(v) for k, v in self.label_warnings.items()}
        if not isinstance(self.findings, list) or not all(isinstance(f, str) and f.strip() for f in self.findings):
            fail("findings must be a list of non-empty strings")
        if not isinstance(self.defaults, dict):
            fail("defaults must be a mapping")
        try:  # the one sampling policy checks the defaults too
            self.defaults = check_model_defaults(self.defaults)
        except InputError as error:
            fail(f"defaults: {error}".rstrip("."))
        if not isinstance(self.field_of_view_mm, (int, float)) or not self.field_of_view_mm > 0:
            fail(f"field_of_view_mm must be a positive number, not {self.field_of_view_mm!r}")
        if not isinstance(self.controlnets, dict):
            fail("controlnets must be a mapping of control name to {\"scale\": default scale}")
        scales = {}
        for name, entry in self.controlnets.items():
            if name not in CONTROL_NAMES:
                fail(f"controlnets: {shown(name)!r} is not a control ({', '.join(CONTROL_NAMES)})")
            scale = entry.get("scale", 1.0) if isinstance(entry, dict) else entry
            try:
                scales[name] = check_scale(scale, name)
            except InputError as error:
                fail(f"controlnets: {error}".rstrip("."))
        self.controlnets = scales

    @property
    def pixel_spacing_mm(self) -> float:
        return float(self.field_of_view_mm) / self.image_size

    def controlnet_scale(self, name: str, scale=None) -> float:
        """The scale control ``name`` runs at: ``scale`` (checked) or the model's default; InputError when this
        model has no ControlNet for it (the one sentence for that, before and after loading)."""
        if name not in self.controlnets:
            raise InputError(missing_controlnet_sentence(name, self.controlnets))
        return self.controlnets[name] if scale is None else check_scale(scale, name)

    def label_values(self) -> list[int]:
        """Anatomy label values this model knows (background 0 excluded)."""
        return sorted(int(k) for k in self.anatomy_labels)

    def ignored_label_values(self) -> list[int]:
        """Labels a user may draw that this model was trained without: accepted with their warning, then
        treated as background (e.g. the aorta for the demo model)."""
        return sorted(int(k) for k in self.label_warnings if k not in self.anatomy_labels)

    def accepted_label_values(self) -> list[int]:
        """Every label value an anatomy map may hold for this model (background 0 excluded)."""
        return sorted(set(self.label_values()) | set(self.ignored_label_values()))

    def to_dict(self) -> dict:
        data = asdict(self)
        order = ["format_version", "model_id", "description", "image_size", "latent_size", "scale_factor",
                 "anatomy_labels", "label_warnings", "findings", "defaults", "field_of_view_mm"]
        result = {key: data[key] for key in order}
        if self.controlnets:  # only models with ControlNets carry the key (older files stay byte-identical)
            result["controlnets"] = {name: {"scale": scale} for name, scale in self.controlnets.items()}
        return result

    def save(self, model_dir: str | Path) -> Path:
        path = Path(model_dir) / MODEL_INFO_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict, source: str = "model metadata") -> "ModelInfo":
        if not isinstance(data, dict):
            raise ModelError(f"{source}: expected a JSON object.")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ModelError(f"{source}: unknown fields {unknown}.")
        if "model_id" not in data:
            raise ModelError(f"{source}: the field model_id is missing.")
        # Bypass __post_init__ so that validation errors name the file, not "model metadata".
        info = object.__new__(cls)
        for name, spec in known.items():
            if name in data:
                value = data[name]
            elif spec.default is not MISSING:
                value = spec.default
            else:
                value = spec.default_factory()
            setattr(info, name, value)
        info.validate(source)
        return info

    @classmethod
    def load(cls, model_dir: str | Path) -> "ModelInfo":
        """Read ``xreal_model.json``; ModelError if ``model_dir`` is not a model directory."""
        model_dir = Path(model_dir)
        path = model_dir / MODEL_INFO_FILE
        if model_dir.exists() and not model_dir.is_dir():
            raise ModelError(f"{model_dir} is a file, not a model directory; give the folder with {MODEL_INFO_FILE}.")
        if not model_dir.is_dir():
            raise ModelError(f"The model directory {model_dir} does not exist.")
        if not path.is_file():
            raise ModelError(f"{model_dir} is not an XReal model directory: {MODEL_INFO_FILE} is missing.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{path} cannot be read as JSON ({error}).") from None
        return cls.from_dict(data, source=str(path))



def canonical_finding(finding, known_findings, removal_allowed: bool = False) -> str:
    """The model's spelling of ``finding`` (matched case-insensitively), or InputError with one sentence.

    ``""`` removes a finding, which only an edit of an existing X-ray can do. A model that lists no
    findings accepts any text (a converted model with its own vocabulary).
    """
    if not isinstance(finding, str):
        raise InputError(f"A finding must be text, not {type(finding).__name__}.")
    name = finding.strip()
    if name == "":
        if removal_allowed:
            return ""
        raise InputError("An empty finding removes a finding, which works only when editing an X-ray (--image).")
    if not known_findings:
        return name
    by_lower = {known.lower(): known for known in known_findings}
    if name.lower() not in by_lower:
        raise InputError(f"This model does not know the finding '{shown(name)}'; it knows: "
                         f"{', '.join(known_findings)}.")
    return by_lower[name.lower()]


def check_model_dir(model_dir: str | Path) -> Path:
    """A directory with metadata, ``model_index.json`` and every component folder, else ModelError."""
    model_dir = Path(model_dir)
    ModelInfo.load(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(f"{model_dir} is not an XReal model directory: model_index.json is missing.")
    missing = [name for name in COMPONENTS if not (model_dir / name).is_dir()]
    if missing:
        raise ModelError(f"{model_dir} is not a complete XReal model directory: missing {', '.join(missing)}.")
    info = ModelInfo.load(model_dir)
    for name in info.controlnets:
        if not (model_dir / controlnet_folder(name) / "config.json").is_file():
            raise ModelError(f"{model_dir} lists a {name} ControlNet in {MODEL_INFO_FILE} but "
                             f"{controlnet_folder(name)}/config.json is missing.")
    return model_dir


def resolve_model(name_or_path: str | Path) -> Path:
    """``"demo"`` -> the shipped demo model; anything else is a path to a model directory."""
    if str(name_or_path) == "demo":
        if not (DEMO_MODEL_DIR / MODEL_INFO_FILE).is_file():
            raise ModelError(
                f"The demo model is not installed (expected it in {DEMO_MODEL_DIR}); "
                "pass --model with the path of a model directory."
            )
        return check_model_dir(DEMO_MODEL_DIR)
    if not str(name_or_path).strip():  # Path("") would be the current folder
        raise ModelError("The model name is empty; give 'demo' or the path of a model directory.")
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelError(f"The model {name_or_path} is neither 'demo' nor an existing directory.")
    return check_model_dir(path.resolve())


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over every ``*.safetensors`` file (relative path + bytes, sorted by path), for provenance."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.rglob("*.safetensors"), key=lambda p: p.relative_to(model_dir).as_posix())
    if not files:
        raise ModelError(f"{model_dir} holds no .safetensors weights.")
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(model_dir).as_posix().encode() + b"\0")
        with path.open("rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def parameter_counts(model_dir: str | Path) -> dict[str, int]:
    """Parameters per component (and per ControlNet folder), read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    counts = {}
    for component in COMPONENTS + tuple(controlnet_folder(name) for name in ModelInfo.load(model_dir).controlnets):
        total = 0
        for path in sorted((model_dir / component).glob("*.safetensors")):
            try:
                with safe_open(str(path), framework="numpy") as weights:
                    for key in weights.keys():
                        numel = 1
                        for size in weights.get_slice(key).get_shape():
                            numel *= size
                        total += numel
            except Exception as error:  # noqa: BLE001 - SafetensorError (truncated, not safetensors), OSError
                raise ModelError(f"{component}/{path.name} in {model_dir} is damaged or not a safetensors file "
                                 f"({type(error).__name__}); copy the model again.") from None
        if total:
            counts[component] = total
    return counts


def describe_model(model_dir: str | Path) -> dict:
    """Everything ``info`` prints, as a dict (no weights are loaded)."""
    model_dir = resolve_model(model_dir)
    info = ModelInfo.load(model_dir)
    index = json.loads((model_dir / "model_index.json").read_text(encoding="utf-8"))
    counts = parameter_counts(model_dir)
    vocab = model_dir / "tokenizer" / "vocab.txt"
    return {
        "path": str(model_dir),
        "model_id": info.model_id,
        "description": info.description,
        "pipeline": index.get("_class_name"),
        "components": {
            name: {"class": index.get(name, [None, None])[1], "parameters": counts.get(name)}
            for name in COMPONENTS
        },
        "total_parameters": sum(counts.get(name, 0) for name in COMPONENTS),  # the ControlNets are listed apart
        "tokenizer_vocab_size": sum(1 for _ in vocab.open(encoding="utf-8")) if vocab.is_file() else None,
        "image_size": info.image_size,
        "latent_size": info.latent_size,
        "scale_factor": info.scale_factor,
        "field_of_view_mm": info.field_of_view_mm,
        "anatomy_labels": info.anatomy_labels,
        "label_warnings": info.label_warnings,
        "findings": info.findings,
        "defaults": info.defaults,
        "controlnets": {name: {"folder": controlnet_folder(name), "scale": scale,
                               "parameters": counts.get(controlnet_folder(name))}
                        for name, scale in info.controlnets.items()},
    }
