"""Every command in README.md's bash blocks, as written, after a demo run.

The demo itself is replaced by a micro run of the same loop (the session's `micro_em_run`: `bolt em`
on the toy config with small sizes and three iterations, linked as runs/demo of a scratch
directory, so every runs/demo/... path the README names exists). Then each command line of each
bash block, in order, with the scratch directory as the working directory:

- RUN: `bolt ...` and plain shell lines (`echo ...`) run in bash and must exit 0;
- EM (parsed, not run): `bolt em ...` lines: one is the full demo (minutes), the other needs your
  corpus files and an API key; their configs must load;
- CLUSTER (parsed, not run): `torchrun ...`, `srun ...`: the module entry must parse `train --help`;
- SKIPPED: `make demo`, `make test` (the precondition and this suite).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, scrubbed_env

pytestmark = pytest.mark.slow

def readme_commands() -> list[str]:
    """The command lines of README.md's ```bash blocks, continuation lines joined, comments kept."""
    text = (REPO / "README.md").read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines


def kind(line: str) -> str:
    words = shlex.split(line, comments=True)
    if words[:2] in (["make", "demo"], ["make", "test"]):
        return "skipped"
    if words[0] in ("torchrun", "srun", "sbatch"):
        return "cluster"
    if words[:2] == ["bolt", "em"]:
        return "em"
    return "run"


def test_readme_lists_what_this_test_covers():
    kinds = [kind(line) for line in readme_commands()]
    assert kinds.count("run") >= 5 and kinds.count("em") == 2 and kinds.count("cluster") == 2
    assert kinds.count("skipped") == 2


def test_readme_commands_run_as_written(micro_em_run, tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(micro_em_run)  # the session's micro demo (read only)

    env = scrubbed_env(PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                       PYTHONPATH=str(REPO))
    from megatron_bolt.cli import main
    from megatron_bolt.config import load_em_config

    ran = []
    for line in readme_commands():
        k = kind(line)
        words = shlex.split(line, comments=True)
        if k == "run":
            proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, f"README command failed: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            ran.append(words[:2])
        elif k == "em":
            load_em_config(tmp_path / words[2], words[3:])
        elif k == "cluster":
            assert words[words.index("-m") + 1 : words.index("-m") + 3] == ["megatron_bolt", "train"]
            with pytest.raises(SystemExit) as exc:
                main(["train", "--help"])
            assert exc.value.code == 0
    assert ["bolt", "train"] in ran and ["bolt", "score"] in ran and ["bolt", "eval"] in ran
    assert (tmp_path / "scores.jsonl").read_text().count("logprob") == 1
    assert (tmp_path / "runs" / "eval" / "accuracy.json").is_file()
