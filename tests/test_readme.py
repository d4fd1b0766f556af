"""Every command in README.md's bash blocks, as written, after a demo run.

The demo itself is replaced by a micro run of the same loop (`bolt demo` with small sizes, three
iterations, into runs/demo of a scratch directory, so every runs/demo/... path the README names
exists). Then each command line of each bash block, in order, with the scratch directory as the
working directory:

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
from conftest import REPO, bolt, scrubbed_env

pytestmark = pytest.mark.slow

MICRO_TRAIN = """
model: {num_layers: 2, hidden_size: 32, num_attention_heads: 2, ffn_hidden_size: 64, seq_len: 128}
train: {steps: 3, micro_batch: 4, global_batch: 4, lr: 3.0e-3, min_lr: 3.0e-4, warmup: 1, log_interval: 1}
"""
MICRO_DEMO = {
    "corpus.toy_warm_docs": 6, "corpus.toy_rest_docs": 6, "corpus.toy_valid_docs": 2,
    "warmstart.train_steps": "null", "ablation_samples": "[]", "iterations": 3,
    "estep.samples": 2, "estep.max_latent_tokens": 8, "engine.threads": 1,
    "eval.limit": 4, "eval.shots": 1, "eval.max_new_tokens": 16, "iwae_samples": "[1, 2]",
}


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


def test_readme_commands_run_as_written(tmp_path):
    (tmp_path / "examples").symlink_to(REPO / "examples")
    (tmp_path / "micro_train.yaml").write_text(MICRO_TRAIN)
    overrides = {**MICRO_DEMO, "train_config": str(tmp_path / "micro_train.yaml")}
    demo = bolt("demo", "--output-dir", "runs/demo", *(f"{k}={v}" for k, v in overrides.items()),
                timeout=1200, cwd=tmp_path)
    assert "iter3 (K=2)" in demo.stdout

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
