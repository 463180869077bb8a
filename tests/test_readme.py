"""Every `python medko.py` command README.md and docs/*.md show (indented code-block lines) runs as a subprocess,
as a user types it, so a documented command cannot break unnoticed. Each runs in a directory holding `data/` (the
bundled data) and `runs/default` (the rehearsed 4B run of test_rehearsal), offline, with the fake hub cache.

Substitutions, each because the command as written would take minutes on a CPU or need the network:
- `--size 270m` (and the default size) becomes `--model TINY`: the real 270M costs minutes here;
- `--model DIR` becomes the tiny checkpoint;
- generate-mode and translation commands get a small `--max-new-tokens`: the tiny model's output is noise.

A command that reads what another documented command writes (`--agree-with FILE`) runs after that one, in the same
directory; `runs/lora-sft` is the same rehearsed run under a second name (compare then pairs it with itself).
"""
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import hub_env

# Under `pytest -n 2 --dist loadgroup` this file's tests share one worker and its session fixtures.
pytestmark = pytest.mark.xdist_group("hub-rehearsal")

ROOT = Path(__file__).resolve().parents[1]
FEW_TOKENS = ["--max-new-tokens", "8"]


# docs/faults.md's commands read the damaged files they describe: tests/test_faults.py runs them where those exist.
DOCUMENTS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "faults.md")]


def documented_commands(path: Path) -> list[str]:
    """The `python medko.py ...` lines of a Markdown file's indented code blocks, comments dropped."""
    lines = re.findall(r"^    (python medko\.py[^\n]*)$", path.read_text(), re.M)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines]


def readme_commands() -> list[str]:
    """The commands of README.md and docs/*.md, each once, in the order they first appear."""
    return list(dict.fromkeys(c for path in DOCUMENTS for c in documented_commands(path)))


def substituted(command: str, tiny: Path) -> list[str]:
    argv = shlex.split(command)[2:]
    if argv[0] in ("generate", "eval", "translate") and "--run" not in argv:
        if "--size" in argv:
            i = argv.index("--size")
            argv[i:i + 2] = []
        argv = [str(tiny) if a == "DIR" else a for a in argv]
        if "--model" not in argv:
            argv += ["--model", str(tiny)]
    if argv[0] == "translate" or "generate" in argv or "both" in argv:
        if "--max-new-tokens" not in argv:
            argv += FEW_TOKENS
    return [sys.executable, str(ROOT / "medko.py"), *argv]


def test_readme_lists_the_commands_this_test_runs():
    from medko import build_parser

    commands = readme_commands()
    assert len(documented_commands(ROOT / "README.md")) >= 5 and any(" eval --run " in c for c in commands)
    assert len(commands) >= 12 and any(path.parent.name == "docs" and documented_commands(path) for path in DOCUMENTS)
    subcommands = next(a.choices for a in build_parser()._actions if a.dest == "command")
    for command in commands:
        assert command.split()[2] in {"--help", *subcommands}, command


def writers(command: str) -> list[str]:
    """The documented commands whose --out is a file this command reads with --agree-with."""
    argv = shlex.split(command)
    reads = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--agree-with"}
    return [c for c in readme_commands() if any(f"--out {name}" in c for name in reads)]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_written(command, tiny_dir, hub_cache, rehearsed_run, tmp_path):
    import shutil

    (tmp_path / "data").symlink_to(ROOT / "data")
    shutil.copytree(rehearsed_run, tmp_path / "runs" / "default")
    if "runs/lora-sft" in command:
        shutil.copytree(rehearsed_run, tmp_path / "runs" / "lora-sft")
    env = hub_env(hub_cache, tmp_path / "hf")
    for writer in writers(command):
        done = subprocess.run(substituted(writer, tiny_dir), capture_output=True, text=True, cwd=tmp_path,
                              timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
    argv = substituted(command, tiny_dir)
    out = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600, env=env)
    assert "Traceback" not in out.stderr
    if "--format" in argv and argv[argv.index("--format") + 1] == "gguf":
        # The rehearsal's 2-layer tiny MedGemma has its full-attention layer at index 1, which llama.cpp's gemma3
        # (every sixth layer global) cannot express, so export must refuse it in one sentence; tests/test_export.py
        # writes GGUFs of models llama.cpp can express and reads them back.
        assert out.returncode == 1 and "every sixth layer" in out.stderr.splitlines()[-1], out.stderr[-2000:]
        return
    assert out.returncode == 0, f"{argv}\n{out.stderr[-3000:]}"
    if "--out" in argv:
        target = tmp_path / argv[argv.index("--out") + 1]
        assert target.exists(), target
