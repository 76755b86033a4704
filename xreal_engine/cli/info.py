"""``xreal-engine info``: describe a model directory (no weights are loaded)."""

from __future__ import annotations

import argparse
import json

from ..model.info import describe_model, weights_hash


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
    controlnets = description.get("controlnets") or {}
    print("controlnets " + ("" if controlnets else "(none)"))
    for name, controlnet in controlnets.items():
        count = f"{controlnet['parameters']:>15,d} parameters" if controlnet.get("parameters") else ""
        print(f"  {name:<20} {controlnet['folder'] + '/':<24} default scale {controlnet['scale']:g}  {count}".rstrip())
    if "weights_sha256" in description:
        print(f"weights     sha256 {description['weights_sha256']}")
    return 0
