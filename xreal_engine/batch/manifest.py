"""Batch manifests: one row per image, read from CSV or JSONL and checked up front with their row numbers.

A row is one :class:`generate.GenerationRequest` plus the name of its result directory. Every row is
validated with :func:`generate.prepare_request` (no model needed) before anything is generated or
written, and every problem is reported as ``row N: <sentence>``, N being the line the row starts on
(the CSV header is row 1). Columns / keys:

``name``            result directory name (letters, digits, ``.``, ``_``, ``-``); default: the row number
``anatomy``         anatomy file (relative to the manifest), or a template name such as ``anatomy_01``
``pathology_masks`` + ``findings``   CSV: ``;``-separated lists of equal length (a finding may be empty in edit mode)
``pathologies``     JSONL: a list of ``{"mask": FILE, "finding": NAME}``
``image``           edit mode: the X-ray to edit
``seed``            required
``steps`` ``anatomy_steps`` ``guidance`` ``eta`` ``soft_mask_value`` ``sampler`` ``fast`` ``control_stages``
``keep_outside_region``   optional sampling settings (model/sampling.py's public names)
``controls``        optional ControlNets: CSV ``;``-separated ``NAME[:FILE][:SCALE]`` (as ``generate --control``);
                    JSONL a list of such strings or of ``{"name": NAME, "file": FILE, "scale": SCALE}``

A value without a folder and without a file suffix is a template name: a file of the templates folder
(``--templates``, else the package's ``templates/``, else ``Resources/Templates`` beside the engine).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..control_spec import ControlRequest, check_request, parse_control
from ..errors import InputError, XRealError, shown
from ..files import PLAIN_NAME_PATTERN
from ..generate import GenerationRequest, prepare_request
from ..model.sampling import SETTINGS, SWITCHES, public_names

SAMPLING_KEYS = tuple(name for name in public_names() if name != "seed")
NUMBER_KEYS = tuple(setting.public_name for setting in SETTINGS.values())  # CSV cells read as numbers
BOOLEAN_KEYS = ("fast",) + tuple(SWITCHES)  # CSV cells read as true/false
CSV_COLUMNS = ("name", "anatomy", "pathology_masks", "findings", "image", "seed") + SAMPLING_KEYS + ("controls",)
JSONL_KEYS = ("name", "anatomy", "pathologies", "image", "seed") + SAMPLING_KEYS + ("controls",)
# The templates: package data of an installed wheel (in a checkout, xreal_engine/templates is a link to
# Resources/Templates, the one copy of the PNGs); the Slicer extension has Resources/Templates beside the engine.
TEMPLATES_DIRS = (Path(__file__).resolve().parents[1] / "templates",
                  Path(__file__).resolve().parents[2] / "Resources" / "Templates")
MAX_PROBLEMS_SHOWN = 20


@dataclass(frozen=True)
class BatchRow:
    """One image to make: a generation request (absolute paths) and its result directory name."""

    row: int  # where the row starts in its manifest, for messages
    name: str
    anatomy: Optional[str]
    pathologies: tuple = ()  # ((mask path, finding), ...)
    image: Optional[str] = None
    seed: object = None
    sampling: dict = field(default_factory=dict)  # public names, unset ones left out
    controls: tuple = ()  # ((name, absolute file or None, scale or None), ...)
    design: dict = field(default_factory=dict)  # what a generator made the row from (template, finding, edits)

    def request(self) -> GenerationRequest:
        return GenerationRequest(
            anatomy_path=Path(self.anatomy) if self.anatomy else None,
            pathologies=[(Path(mask), finding) for mask, finding in self.pathologies],
            image_path=Path(self.image) if self.image else None,
            seed=self.seed,
            sampling=dict(self.sampling),
            controls=[ControlRequest(name, Path(file) if file else None, scale) for name, file, scale in self.controls],
        )

    def to_json(self) -> dict:
        data = asdict(self)
        data["pathologies"] = [list(pair) for pair in self.pathologies]
        data["controls"] = [list(control) for control in self.controls]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "BatchRow":
        return cls(**{**data, "pathologies": tuple(tuple(pair) for pair in data.get("pathologies", ())),
                      "controls": tuple(tuple(control) for control in data.get("controls", ()))})

    def content(self) -> dict:
        """What the row asks for, without where it stood (a restart may move rows around)."""
        data = self.to_json()
        del data["row"]
        return data


# ----------------------------------------------------------------------------- templates


def find_templates(given: Optional[Path] = None) -> Path:
    """The templates folder: ``given``, else the first of ``TEMPLATES_DIRS`` that holds templates."""
    if given is not None:
        if not Path(given).is_dir():
            raise InputError(f"The templates folder {given} does not exist; pass --templates with the folder of "
                             "anatomy_01.png ... (Resources/Templates in the XRealSlicer source).")
        return Path(given)
    for folder in TEMPLATES_DIRS:
        if any(folder.glob("anatomy_*.png")):
            return folder
    raise InputError("This installation has no anatomy templates (xreal_engine/templates); pass --templates with "
                     "the folder of anatomy_01.png ... (Resources/Templates in the XRealSlicer source).")


def template_files(folder: Path) -> dict:
    """Template name (file stem) -> path, for every PNG of the folder."""
    return {path.stem: path for path in sorted(Path(folder).glob("*.png"))}


def is_template_name(value: str) -> bool:
    return "/" not in value and "\\" not in value and not Path(value).suffix


class _Resolver:
    """Manifest values -> absolute paths; template names looked up (and the folder found) only when used."""

    def __init__(self, base_dir: Path, templates: Optional[Path]):
        self.base_dir = Path(base_dir)
        self.templates_given = templates
        self._templates: Optional[dict] = None

    def __call__(self, value, what: str) -> Optional[str]:
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise InputError(f"The {what} must be a file name, not {type(value).__name__}.")
        if is_template_name(value):
            if self._templates is None:
                self._templates = template_files(find_templates(self.templates_given))
            if value not in self._templates:
                raise InputError(f"'{shown(value)}' names no template (templates: {', '.join(self._templates)}).")
            return str(self._templates[value])
        return str((self.base_dir / value).resolve())


# ----------------------------------------------------------------------------- reading


def read_manifest(path: Path, templates: Optional[Path] = None, sampling_defaults: Optional[dict] = None):
    """(rows, problems) of a ``.csv`` or ``.jsonl`` manifest; the problems name their rows."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"The manifest {path} is a directory; give a .csv or .jsonl file.")
    if not path.is_file():
        raise InputError(f"The manifest {path} does not exist.")
    resolve = _Resolver(path.parent, templates)
    defaults = {k: v for k, v in (sampling_defaults or {}).items() if v is not None}
    suffix = path.suffix.lower()
    if suffix == ".csv":
        records = _csv_records(path)
    elif suffix in (".jsonl", ".ndjson"):
        records = _jsonl_records(path)
    else:
        raise InputError(f"The manifest {path.name} must be a .csv or .jsonl file.")
    rows, problems = [], []
    for row_number, record in records:
        try:
            if isinstance(record, XRealError):
                raise record
            rows.append(_row(row_number, record, resolve, defaults))
        except XRealError as error:
            problems.append(f"row {row_number}: {error}")
    if not rows and not problems:
        problems.append(f"row 1: the manifest {path.name} has no rows.")
    return rows, problems


def _csv_records(path: Path):
    """(row number, dict of cells) per data row; a malformed line ends the file (the rest is unreadable)."""
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
        reader = csv.reader(handle, strict=True)
        header = next(reader, None)
    except (UnicodeDecodeError, csv.Error) as error:
        yield 1, InputError(f"the header cannot be read as CSV ({error}).")
        return
    with handle:
        if header is None:
            return
        header = [name.strip() for name in header]
        repeated = next((name for k, name in enumerate(header) if name in header[:k]), None)
        if repeated is not None:  # csv's dict would keep only the last cell of a repeated column
            yield 1, InputError(f"the column '{shown(repeated)}' appears twice in the header; give each column once.")
            return
        unknown = [name for name in header if name not in CSV_COLUMNS]
        if unknown:
            yield 1, InputError(f"unknown columns {unknown}; the known ones are {', '.join(CSV_COLUMNS)}.")
            return
        row_number = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as error:
                yield row_number, InputError(f"malformed CSV line ({error}); the rows after it were not read.")
                return
            if cells:  # blank lines are skipped
                if len(cells) != len(header):
                    yield row_number, InputError(f"the line has {len(cells)} fields but the header has {len(header)}.")
                else:
                    try:
                        record = _typed_csv_cells(dict(zip(header, cells)))
                    except InputError as error:  # this row's problem; the rows after it are still checked
                        record = error
                    yield row_number, record
            row_number = reader.line_num + 1


def _typed_csv_cells(cells: dict) -> dict:
    """CSV text -> the JSON types (numbers, booleans, lists); empty cells are unset."""
    record = {}
    for key, text in cells.items():
        text = text.strip()
        if text == "" and key != "findings":
            continue
        if key in NUMBER_KEYS:
            record[key] = _number(text)
        elif key == "controls":
            record[key] = [part.strip() for part in text.split(";") if part.strip()]
        elif key in BOOLEAN_KEYS:
            record[key] = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(
                text.lower(), text)
        else:
            record[key] = text
    masks = [m.strip() for m in record.pop("pathology_masks", "").split(";")] if "pathology_masks" in record else []
    findings_text = record.pop("findings", "")
    findings = [f.strip() for f in findings_text.split(";")] if (findings_text or masks) else []
    if len(masks) != len(findings):
        raise InputError(f"{len(masks)} pathology masks but {len(findings)} findings; give one finding per mask "
                         "(';'-separated).")
    record["pathologies"] = [{"mask": mask, "finding": finding} for mask, finding in zip(masks, findings)]
    return record


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text  # the sampling policy refuses it with its own sentence


def _jsonl_records(path: Path):
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        yield 1, InputError("the manifest is not UTF-8 text.")
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            yield number, InputError(f"the line is not valid JSON ({error.msg}).")
            continue
        except RecursionError:
            yield number, InputError("the line is not valid JSON (nested too deeply).")
            continue
        if not isinstance(record, dict):
            yield number, InputError("the line must be a JSON object.")
            continue
        unknown = sorted(set(record) - set(JSONL_KEYS))
        if unknown:
            yield number, InputError(f"unknown keys {unknown}; the known ones are {', '.join(JSONL_KEYS)}.")
            continue
        yield number, record


def _row(row_number: int, record: dict, resolve: _Resolver, defaults: dict) -> BatchRow:
    pairs = record.get("pathologies") or []
    if not isinstance(pairs, list):
        raise InputError("'pathologies' must be a list of {\"mask\": FILE, \"finding\": NAME}.")
    pathologies = []
    for pair in pairs:
        if not isinstance(pair, dict) or set(pair) != {"mask", "finding"}:
            raise InputError("each pathology must be {\"mask\": FILE, \"finding\": NAME}.")
        mask = resolve(pair["mask"], "pathology mask")
        if mask is None:
            raise InputError("a pathology has no mask file.")
        pathologies.append((mask, pair["finding"]))
    if record.get("seed") is None:
        raise InputError("the seed is missing; every row needs one (it is what makes the image reproducible).")
    name = record.get("name")
    name = f"{row_number:06d}" if name is None else name
    if not isinstance(name, str) or not PLAIN_NAME_PATTERN.fullmatch(name):
        raise InputError(f"the name '{shown(name)}' is not a usable directory name (letters, digits, '.', '_', '-'; "
                         "not starting with '.' or '-').")
    sampling = {**defaults, **{key: record[key] for key in SAMPLING_KEYS if record.get(key) is not None}}
    anatomy = record.get("anatomy")
    design = {"template": anatomy} if isinstance(anatomy, str) and anatomy and is_template_name(anatomy) else {}
    return BatchRow(row=row_number, name=name, anatomy=resolve(anatomy, "anatomy"),
                    pathologies=tuple(pathologies), image=resolve(record.get("image"), "image"),
                    seed=record["seed"], sampling=sampling, controls=_controls(record.get("controls"), resolve),
                    design=design)


def _controls(value, resolve: _Resolver) -> tuple:
    """A row's controls as ((name, absolute file or None, scale or None), ...), checked by control_spec."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise InputError("'controls' must be a list of \"NAME[:FILE][:SCALE]\" or {\"name\", \"file\", \"scale\"}.")
    controls = []
    for item in value:
        if isinstance(item, str):
            request = parse_control(item)
        elif isinstance(item, dict) and "name" in item and set(item) <= {"name", "file", "scale"}:
            request = ControlRequest(item["name"], item.get("file"), item.get("scale"))
        else:
            raise InputError("each control must be \"NAME[:FILE][:SCALE]\" or {\"name\": NAME, \"file\": FILE, "
                             "\"scale\": SCALE}.")
        file = None if request.source is None else resolve(str(request.source), f"{request.name} control file")
        request = check_request(ControlRequest(request.name, Path(file) if file else None, request.scale))
        controls.append((request.name, file, request.scale))
    return tuple(controls)


# ----------------------------------------------------------------------------- checking


def check_rows(rows: list, model_info, skip: frozenset = frozenset()) -> list:
    """Problems of ``rows`` (duplicate names; every input through ``prepare_request``), as ``row N: ...``.

    Rows named in ``skip`` (finished earlier) are checked for duplicate names only. Rows that differ
    only in the seed share one reading of their files; the seed is checked per row first, so one row's
    bad seed is never another row's reason.
    """
    problems, seen, checked = [], {}, {}
    for row in rows:
        key = row.name.casefold()  # result directories must differ on case-insensitive disks too
        if key in seen:
            problems.append(f"row {row.row}: the name '{row.name}' is also the name of row {seen[key]}.")
            continue
        seen[key] = row.row
        if row.name in skip:
            continue
        inputs = json.dumps([row.anatomy, row.pathologies, row.image, row.sampling, row.controls], sort_keys=True)
        try:
            SETTINGS["seed"].check(row.seed)  # the one input the shared reading below does not cover
            if inputs not in checked:
                checked[inputs] = ""
                try:
                    prepare_request(row.request(), model_info)
                except XRealError as error:
                    checked[inputs] = str(error)
            if checked[inputs]:
                raise InputError(checked[inputs])
        except XRealError as error:
            problems.append(f"row {row.row}: {error}")
    return problems


def report_problems(problems: list, source: str) -> InputError:
    """Print the problems (at most MAX_PROBLEMS_SHOWN) and return the one-line error to raise."""
    import sys

    problems = sorted(problems, key=_row_number)  # reading and checking find them in two passes
    for problem in problems[:MAX_PROBLEMS_SHOWN]:
        print(f"  {source} {problem}", file=sys.stderr)
    if len(problems) > MAX_PROBLEMS_SHOWN:
        print(f"  ... and {len(problems) - MAX_PROBLEMS_SHOWN} more", file=sys.stderr)
    return InputError(f"{len(problems)} manifest row{'s have' if len(problems) != 1 else ' has a'} "
                      f"problem{'s' if len(problems) != 1 else ''} (listed above); nothing was generated.")


def _row_number(problem: str) -> int:
    match = re.match(r"row (\d+):", problem)
    return int(match.group(1)) if match else 0

