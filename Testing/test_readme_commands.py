"""Every ``xreal-engine`` command in the README's shell blocks either runs as written (offline, default model)
or is listed here with the reason it cannot; a new README command must be one or the other.

The commands run in order in a scratch directory that sees the repository's ``Resources/`` (the edit example
edits the image the first example made). Marked slow: they generate with the default settings.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# Command prefix -> why the test does not run it.
NOT_RUN = {
    "xreal-engine convert": "needs the official XReal checkpoints (Testing/test_convert_*.py cover conversion)",
    "xreal-engine generate --model models/xreal": "needs a converted official model",
    "xreal-engine generate --model MODEL": "MODEL, reference.png and fixations.csv are placeholders",
    "xreal-engine info --model MODEL": "MODEL is a placeholder",
    "xreal-engine generate-batch --from-templates": "makes 12,000 images (Testing/test_batch.py runs these options small)",
    "xreal-engine generate-batch --manifest rows.csv": "rows.csv and its masks are placeholders",
}


def readme_commands() -> list[list[str]]:
    """The ``xreal-engine`` command lines of the README's bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith("xreal-engine "):
                commands.append(shlex.split(line, comments=True))
    return commands


def reason_not_run(argv: list[str]) -> str | None:
    text = " ".join(argv)
    return next((why for prefix, why in NOT_RUN.items() if text.startswith(prefix)), None)


def test_every_readme_command_is_run_or_excused():
    commands = readme_commands()
    assert len(commands) >= 6
    used = {prefix for argv in commands for prefix in NOT_RUN if " ".join(argv).startswith(prefix)}
    assert used == set(NOT_RUN), f"NOT_RUN lists commands the README no longer has: {set(NOT_RUN) - used}"
    runnable = [argv for argv in commands if reason_not_run(argv) is None]
    assert any(argv[1:3] == ["generate", "--anatomy"] for argv in runnable)
    assert any("--image" in argv for argv in runnable)


def test_readme_findings_are_known_to_the_default_model():
    from xreal_engine.model.info import DEMO_MODEL_DIR, ModelInfo

    known = set(ModelInfo.load(DEMO_MODEL_DIR).findings)
    for argv in readme_commands():
        if reason_not_run(argv) is None:
            for flag, value in zip(argv, argv[1:]):
                if flag == "--finding":
                    assert value in known or value == "", f"the README asks the default model for {value!r}"


@pytest.mark.slow
def test_runnable_readme_commands_succeed(tmp_path):
    (tmp_path / "Resources").symlink_to(REPO / "Resources")
    ran = []
    for argv in readme_commands():
        if reason_not_run(argv) is not None:
            continue
        result = subprocess.run([sys.executable, "-m", "xreal_engine.cli", *argv[1:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{' '.join(argv)} failed:\n{result.stderr[-2000:]}"
        if "--out" in argv:
            out = tmp_path / argv[argv.index("--out") + 1]
            assert (out / "sc.dcm").is_file() and (out / "provenance.json").is_file()
        ran.append(argv[1])
    assert ran.count("generate") >= 3 and "info" in ran  # the template run, the edit, generate --help
