"""Load a model config: a bundled name, a config.json path, or a folder holding one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from dqprof.errors import DqprofError

BUNDLED_DIR = "configs"


def bundled_models() -> list[str]:
    """Names of the configs that ship with dqprof (``dqprof shapes --model NAME``)."""
    folder = resources.files("dqprof.models") / BUNDLED_DIR
    return sorted(p.name.removesuffix(".json") for p in folder.iterdir()
                  if p.name.endswith(".json"))


@dataclass(frozen=True)
class ModelConfig:
    name: str  # short name recorded in every record
    fields: dict[str, Any]  # the text config (a multimodal config's text_config)
    source: str  # where it was read from

    @property
    def model_type(self) -> str:
        return str(self.fields.get("model_type", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def load_config(model: str | Path) -> ModelConfig:
    """Read ``model`` as a bundled name, a config.json file or a folder with config.json."""
    text = str(model)
    if text in bundled_models():
        path = resources.files("dqprof.models") / BUNDLED_DIR / f"{text}.json"
        return _parse(json.loads(path.read_text()), name=text, source=f"bundled:{text}")
    p = Path(text)
    if p.is_dir():
        p = p / "config.json"
    if not p.exists():
        known = ", ".join(bundled_models())
        raise DqprofError(f"unknown model '{text}': not a bundled name ({known}) "
                          f"nor a config.json path")
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DqprofError(f"cannot read model config {p}: {e}") from e
    if not isinstance(raw, dict):
        raise DqprofError(f"model config {p} is not a JSON object")
    name = raw.get("_name_or_path") or p.parent.name or p.stem
    return _parse(raw, name=Path(str(name)).name, source=str(p))


def _parse(raw: dict[str, Any], name: str, source: str) -> ModelConfig:
    # Multimodal checkpoints (Gemma 3/4 ConditionalGeneration) nest the decoder config.
    fields = dict(raw.get("text_config") or raw)
    if "model_type" not in fields and "model_type" in raw:
        fields["model_type"] = raw["model_type"]
    if "tie_word_embeddings" not in fields and "tie_word_embeddings" in raw:
        fields["tie_word_embeddings"] = raw["tie_word_embeddings"]
    return ModelConfig(name=name, fields=fields, source=source)
