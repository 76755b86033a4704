"""Model directories: metadata (``xreal_model.json``), lookup, random test models, ``info``.

A model directory is a diffusers pipeline directory (``XRealPipeline.save_pretrained``)
plus ``xreal_model.json``, which holds what no diffusers config records: the anatomy
label names, the finding vocabulary, the pixel geometry and the default sampling
settings. Reading the metadata and hashing the weights needs no torch, so the
server and the job validation can describe a model without loading it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from .errors import ModelError

MODEL_INFO_FILE = "xreal_model.json"
FORMAT_VERSION = 1
COMPONENTS = ("vae", "anatomy_controller", "unet", "text_encoder", "tokenizer", "scheduler")
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"

DEFAULT_ANATOMY_LABELS = {"1": "left lung", "2": "right lung", "3": "heart", "4": "aorta"}
# Used when xreal_engine/vocabulary.json is absent: the findings a random test model knows.
FALLBACK_FINDINGS = (
    "cardiomegaly", "pneumonia", "effusion", "pleural", "pneumothorax", "nodule",
    "consolidation", "opacity", "edema", "atelectasis", "no", "finding",
)
# The original XReal sampling settings (design.md section 3).
DEFAULT_SAMPLING = {
    "num_inference_steps": 100,
    "anatomy_steps": 50,
    "eta": 1.0,
    "guidance_scale": 7.0,
    "soft_mask_value": 0.2,
}


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
    defaults: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    field_of_view_mm: float = 400.0
    format_version: int = FORMAT_VERSION

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
        unknown = sorted(set(self.defaults) - set(DEFAULT_SAMPLING))
        if unknown:
            fail(f"defaults has unknown settings {unknown}")
        self.defaults = {**DEFAULT_SAMPLING, **self.defaults}
        steps, anatomy_steps = self.defaults["num_inference_steps"], self.defaults["anatomy_steps"]
        if not isinstance(steps, int) or not 1 <= steps <= 1000:
            fail(f"defaults.num_inference_steps must be an integer 1..1000, not {steps!r}")
        if not isinstance(anatomy_steps, int) or not 0 <= anatomy_steps <= steps:
            fail(f"defaults.anatomy_steps must be an integer 0..num_inference_steps, not {anatomy_steps!r}")
        if not isinstance(self.field_of_view_mm, (int, float)) or not self.field_of_view_mm > 0:
            fail(f"field_of_view_mm must be a positive number, not {self.field_of_view_mm!r}")

    @property
    def pixel_spacing_mm(self) -> float:
        return float(self.field_of_view_mm) / self.image_size

    def label_values(self) -> list[int]:
        """Anatomy label values this model knows (background 0 excluded)."""
        return sorted(int(k) for k in self.anatomy_labels)

    def to_dict(self) -> dict:
        data = asdict(self)
        order = ["format_version", "model_id", "description", "image_size", "latent_size", "scale_factor",
                 "anatomy_labels", "label_warnings", "findings", "defaults", "field_of_view_mm"]
        return {key: data[key] for key in order}

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
        if not model_dir.is_dir():
            raise ModelError(f"The model directory {model_dir} does not exist.")
        if not path.is_file():
            raise ModelError(f"{model_dir} is not an XReal model directory: {MODEL_INFO_FILE} is missing.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelError(f"{path} cannot be read as JSON ({error}).") from None
        return cls.from_dict(data, source=str(path))

    from_dir = load  # the name generate.py uses


def check_model_dir(model_dir: str | Path) -> Path:
    """A directory with metadata, ``model_index.json`` and every component folder, else ModelError."""
    model_dir = Path(model_dir)
    ModelInfo.load(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ModelError(f"{model_dir} is not an XReal model directory: model_index.json is missing.")
    missing = [name for name in COMPONENTS if not (model_dir / name).is_dir()]
    if missing:
        raise ModelError(f"{model_dir} is not a complete XReal model directory: missing {', '.join(missing)}.")
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
    """Parameters per component, read from the safetensors headers (no weights are loaded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    counts = {}
    for component in COMPONENTS:
        total = 0
        for path in sorted((model_dir / component).glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as weights:
                for key in weights.keys():
                    numel = 1
                    for size in weights.get_slice(key).get_shape():
                        numel *= size
                    total += numel
        if total:
            counts[component] = total
    return counts


# ---------------------------------------------------------------- random test models

def default_findings() -> list[str]:
    """Finding names from xreal_engine/vocabulary.json when present, else a built-in list."""
    path = Path(__file__).resolve().parent / "vocabulary.json"
    findings: list[str] = []
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            data = {}
        entries = data.get("findings", []) if isinstance(data, dict) else []
        if isinstance(entries, dict):
            entries = [{"name": key, **value} if isinstance(value, dict) else key for key, value in entries.items()]
        for entry in entries:
            name = entry.get("name") if isinstance(entry, dict) else entry
            if isinstance(name, str) and name.strip():
                findings.append(name.strip().lower())
    return findings or list(FALLBACK_FINDINGS)


def _vocab_words(findings: list[str]) -> list[str]:
    """WordPiece vocabulary: BERT's special tokens, the finding words, basic punctuation."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for finding in list(findings) + list(FALLBACK_FINDINGS) + ["of", "the", "and", "with", ",", ".", "-"]:
        for word in finding.lower().replace("-", " - ").replace(",", " , ").split():
            if word not in words:
                words.append(word)
    return words


PRESETS = {
    # ~1 s per generation on one CPU core at the default 10 steps: for tests of the other parts.
    "tiny": {
        "image_size": 64, "latent_size": 16, "unet_channels": (32, 32), "unet_layers": 1,
        "unet_attention_levels": (False, True), "unet_heads": 4, "text_width": 64, "text_layers": 2,
        "text_heads": 2, "text_head_dim": 32, "ae_channels": (32, 32, 64), "ae_layers": 1,
        "defaults": {"num_inference_steps": 10, "anatomy_steps": 5},
    },
    # The official XReal architecture (design.md section 3): for benchmarks; ~1.2e9 parameters.
    "full": {
        "image_size": 256, "latent_size": 64, "unet_channels": (224, 448, 896, 896), "unet_layers": 2,
        "unet_attention_levels": (False, True, True, True), "unet_heads": 8, "text_width": 1280,
        "text_layers": 32, "text_heads": 8, "text_head_dim": 64, "ae_channels": (128, 256, 512), "ae_layers": 2,
        "defaults": {},
    },
}


def component_configs(preset: str = "tiny", vocab_size: int = 30522) -> dict:
    """diffusers / LDMBert configs of every network for a preset (shared by tests and benchmarks)."""
    if preset not in PRESETS:
        raise ModelError(f"Unknown model preset {preset!r}; choose one of {', '.join(PRESETS)}.")
    p = PRESETS[preset]
    autoencoder = {
        "in_channels": 3, "out_channels": 3, "latent_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * len(p["ae_channels"]),
        "up_block_types": ["UpDecoderBlock2D"] * len(p["ae_channels"]),
        "block_out_channels": list(p["ae_channels"]), "layers_per_block": p["ae_layers"],
        "sample_size": p["image_size"], "scaling_factor": 0.18215,
    }
    unet = {
        "sample_size": p["latent_size"], "in_channels": 3, "out_channels": 3,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in p["unet_attention_levels"]],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(p["unet_attention_levels"])],
        "block_out_channels": list(p["unet_channels"]), "layers_per_block": p["unet_layers"],
        "attention_head_dim": p["unet_heads"], "cross_attention_dim": p["text_width"],
        "flip_sin_to_cos": True, "freq_shift": 0, "use_linear_projection": False,
    }
    text_encoder = {
        "vocab_size": vocab_size, "max_position_embeddings": 150, "encoder_layers": p["text_layers"],
        "encoder_ffn_dim": 4 * p["text_width"], "encoder_attention_heads": p["text_heads"],
        "head_dim": p["text_head_dim"], "d_model": p["text_width"], "dropout": 0.0,
    }
    scheduler = {
        "num_train_timesteps": 1000, "beta_start": 0.0015, "beta_end": 0.0295,
        "beta_schedule": "scaled_linear", "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon", "timestep_spacing": "leading",
    }
    return {"autoencoder": autoencoder, "unet": unet, "text_encoder": text_encoder, "scheduler": scheduler,
            "image_size": p["image_size"], "latent_size": p["latent_size"], "defaults": dict(p["defaults"])}


def create_random_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, model_id: str | None = None) -> Path:
    """Write a complete, randomly initialised model directory (it generates noise-like images).

    For tests and benchmarks of everything around the sampler: it loads and runs
    exactly like a trained model, at the preset's geometry.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig, LDMBertModel
    from transformers import BertTokenizer

    from .pipeline import XRealPipeline

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelError(f"{out_dir} already exists and is not empty; choose a new directory for the model.")
    findings = default_findings()
    words = _vocab_words(findings)
    configs = component_configs(preset, vocab_size=len(words))
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.txt.tmp"
    vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    try:
        tokenizer = BertTokenizer(str(vocab_file), do_lower_case=True, model_max_length=150)
    finally:
        vocab_file.unlink()

    torch.manual_seed(seed)
    vae = AutoencoderKL(**configs["autoencoder"])
    anatomy_controller = AutoencoderKL(**configs["autoencoder"])
    for autoencoder in (vae, anatomy_controller):
        # Decoder outputs mostly inside [0, 1], like the trained autoencoders (images are in [0, 1]).
        with torch.no_grad():
            autoencoder.decoder.conv_out.weight.mul_(0.35)
            autoencoder.decoder.conv_out.bias.fill_(0.5)
    unet = UNet2DConditionModel(**configs["unet"])
    text_encoder = LDMBertModel(LDMBertConfig(**configs["text_encoder"]))
    scheduler = DDIMScheduler(**configs["scheduler"])
    info = ModelInfo(
        model_id=model_id or f"random-{preset}-seed{seed}",
        description=f"Randomly initialised {preset} XReal model (seed {seed}); produces noise, for tests only.",
        image_size=configs["image_size"], latent_size=configs["latent_size"],
        findings=findings, defaults={**DEFAULT_SAMPLING, **configs["defaults"]},
    )
    pipe = XRealPipeline(vae=vae, anatomy_controller=anatomy_controller, unet=unet, text_encoder=text_encoder,
                         tokenizer=tokenizer, scheduler=scheduler, model_info=info)
    pipe.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------- the `info` command

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
        "total_parameters": sum(counts.values()),
        "tokenizer_vocab_size": sum(1 for _ in vocab.open(encoding="utf-8")) if vocab.is_file() else None,
        "image_size": info.image_size,
        "latent_size": info.latent_size,
        "scale_factor": info.scale_factor,
        "field_of_view_mm": info.field_of_view_mm,
        "anatomy_labels": info.anatomy_labels,
        "label_warnings": info.label_warnings,
        "findings": info.findings,
        "defaults": info.defaults,
    }


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="demo", help="'demo' or the path of a model directory (default: demo)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--hash", action="store_true", help="also compute the weights' sha256 (reads every file)")


def run(args: argparse.Namespace) -> int:
    description = describe_model(args.model)
    if args.hash:
        description["weights_sha256"] = weights_hash(description["path"])
    if args.json:
        print(json.dumps(description, indent=2))
        return 0
    print(f"model       {description['model_id']}  ({description['path']})")
    if description["description"]:
        print(f"            {description['description']}")
    print(f"geometry    image {description['image_size']}x{description['image_size']} px, "
          f"latent {description['latent_size']}x{description['latent_size']}, "
          f"field of view {description['field_of_view_mm']} mm, scale factor {description['scale_factor']}")
    print("components")
    for name, component in description["components"].items():
        count = f"{component['parameters']:>15,d} parameters" if component["parameters"] else ""
        print(f"  {name:<20} {component['class'] or '?':<24} {count}".rstrip())
    print(f"  {'total':<45} {description['total_parameters']:>15,d} parameters")
    print("anatomy     " + ", ".join(f"{k} = {v}" for k, v in description["anatomy_labels"].items()))
    for label, warning in description["label_warnings"].items():
        print(f"  label {label}: {warning}")
    print("findings    " + (", ".join(description["findings"]) or "(any text)"))
    print(f"tokenizer   {description['tokenizer_vocab_size']} word pieces")
    print("defaults    " + ", ".join(f"{k} = {v}" for k, v in description["defaults"].items()))
    if "weights_sha256" in description:
        print(f"weights     sha256 {description['weights_sha256']}")
    return 0
