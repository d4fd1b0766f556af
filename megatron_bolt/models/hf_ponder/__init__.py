"""The Hugging Face side of a ponder (PonderLM-2) model: `configuration_ponder.py` and
`modeling_ponder.py` are copied into every ponder export and loaded with `trust_remote_code=True`."""

from __future__ import annotations

import json
from pathlib import Path

MODEL_TYPE = "ponder_llama"
CODE_FILES = ("configuration_ponder.py", "modeling_ponder.py")
AUTO_MAP = {
    "AutoConfig": "configuration_ponder.PonderConfig",
    "AutoModelForCausalLM": "modeling_ponder.PonderForCausalLM",
}


def code_paths() -> list[Path]:
    return [Path(__file__).with_name(name) for name in CODE_FILES]


def is_ponder_export(model_dir: str | Path) -> bool:
    """True for a directory exported from a ponder checkpoint (its config names our model type):
    loading it needs `trust_remote_code=True`, and the code it runs is this package's."""
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False
