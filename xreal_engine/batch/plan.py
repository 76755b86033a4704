"""An output directory's plan (``OUT/plan.jsonl``) and what a restart may change about it.

A restart must ask for every planned row with the same settings (``check_same_plan``), and for the
same quality check and ``--min-dice`` once a row is finished (``check_same_quality``): finished images are not checked
again, so a changed minimum would make ``dataset.json`` claim a threshold its images were never held to.
Nor may a finished row's input files have changed since its image was made (``check_inputs_unchanged``):
the plan names files, and a file rewritten in place would mix two datasets silently.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..errors import InputError
from .exports import write_text_atomic
from .manifest import BatchRow

PLAN_FILE = "plan.jsonl"


def write_plan(rows: list, path: Path) -> None:
    """The rows as JSON lines: what this output directory is being made of. Input files inside the
    directory (a design's generated masks) are stored relative to it, so a moved or copied directory
    still resumes; files elsewhere keep their absolute paths."""
    home = Path(path).parent.resolve()
    lines = (json.dumps(_moved(row, lambda file: _relative_inside(file, home)).to_json(), sort_keys=True) + "\n"
             for row in rows)
    write_text_atomic(path, "".join(lines))


def read_plan(path: Path) -> list:
    """The rows of a plan with every input path absolute again (relative ones are inside its directory)."""
    if not Path(path).is_file():
        return []
    home = Path(path).parent.resolve()
    return [_moved(BatchRow.from_json(json.loads(line)), lambda file: str(home / file))
            for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _relative_inside(file: str, home: Path) -> str:
    try:
        return Path(file).relative_to(home).as_posix()
    except ValueError:
        return file


def _moved(row: BatchRow, where) -> BatchRow:
    """``row`` with ``where`` applied to each input file path it names."""
    def moved(file):
        return where(file) if file else file

    return replace(row, anatomy=moved(row.anatomy), image=moved(row.image),
                   pathologies=tuple((moved(mask), finding) for mask, finding in row.pathologies),
                   controls=tuple((name, moved(file), scale) for name, file, scale in row.controls))


def check_same_plan(previous: list, rows: list, out: Path) -> None:
    """A restart must ask for every row the directory was planned with, each with the same settings."""
    if not previous:
        return
    new = {row.name: row for row in rows}
    missing = [old.name for old in previous if old.name not in new]
    if missing:
        raise InputError(f"{out} was planned with {len(missing)} row(s) that this command does not ask for (first: "
                         f"'{missing[0]}'); run the same command again, or choose a new --out.")
    changed = [(old, new[old.name]) for old in previous if new[old.name].content() != old.content()]
    if changed:
        old, row = changed[0]
        raise InputError(f"{out} was planned with other settings for {len(changed)} row(s) (first: row {row.row}, "
                         f"'{row.name}': {', '.join(_differences(old.content(), row.content()))}); run the same "
                         "command again, or choose a new --out.")


def _differences(before: dict, now: dict) -> list:
    """What differs, by name; a sampling setting with both values ("steps 2 before, 3 now")."""
    names = []
    for key in sorted(set(before) | set(now)):
        old, new = before.get(key), now.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            names += [f"{name} {old.get(name, 'unset')} before, {new.get(name, 'unset')} now"
                      for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
        else:
            names.append(key)
    return names


def check_same_quality(previous: dict, quality_check: bool, min_dice, finished: int, out: Path) -> None:
    """Refuse another quality check or --min-dice than the finished images of ``out`` had (``previous``:
    dataset.json): they are not checked again, so rows with and without Dice, or held to two minimums,
    would be mixed in one data set under one summary."""
    if not finished or "quality" not in previous:
        return
    before = previous["quality"].get("check")  # None in directories made before it was recorded
    if before is not None and before != quality_check:
        was, now = ("with", "--no-quality-check") if before else ("without", "--quality-check")
        raise InputError(f"{out} holds {finished} finished image(s) made {was} the quality check, which are not "
                         f"checked again; run the same command again (not {now}), or choose a new --out.")
    before = previous["quality"].get("min_dice")
    if before != min_dice:
        shown_before = "no --min-dice" if before is None else f"--min-dice {before:g}"
        shown_now = "none" if min_dice is None else f"{min_dice:g}"
        raise InputError(f"{out} holds {finished} finished image(s) made with {shown_before}, which are not checked "
                         f"again; give the same setting (not {shown_now}), or choose a new --out.")


def check_inputs_unchanged(rows: list, finished: frozenset, images_dir: Path) -> None:
    """Refuse a restart whose finished rows' anatomy map or pathology masks are not the files their images
    were made from (by the sha256 their provenance records; results made before it was recorded pass)."""
    from ..io.controls import file_sha256

    for row in rows:
        if row.name not in finished:
            continue
        recorded = json.loads((images_dir / row.name / "provenance.json").read_text(encoding="utf-8")).get("inputs")
        if not recorded:
            continue
        files = [("anatomy map", row.anatomy, recorded.get("anatomy_sha256"))]
        files += [(f"pathology mask {k}", mask, digest) for k, ((mask, _), digest)
                  in enumerate(zip(row.pathologies, recorded.get("pathology_sha256") or []), start=1)]
        for what, path, digest in files:
            if path and digest and Path(path).is_file() and file_sha256(path) != digest:
                raise InputError(f"Row {row.row} ('{row.name}') is finished, but its {what} {Path(path).name} has "
                                 "changed since its image was made; put the file back, or choose a new --out "
                                 "for the new inputs.")
