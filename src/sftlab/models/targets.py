"""The one place that matches module names: which linear layers a method adapts.

`all-linear`: every linear layer (nn.Linear, or GPT-2's transposed Conv1D) except the output head.
A list: module-name suffixes (`q_proj` matches `model.layers.0.self_attn.q_proj`).
Any other string: a regular expression that must match the full module name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from sftlab.errors import ConfigError


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(model: nn.Module, spec: str | Sequence[str], *, key: str = "lora.targets") -> list[str]:
    """Names of the linear modules `spec` selects; an error lists the model's linear layers if none match."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Layers already inside an adapter (a LoRALinear's `base`) are not targets of their own.
    wrapped = [name + "." for name, module in model.named_modules()
               if hasattr(module, "base") and is_linear(module.base)]
    linear = [name for name, module in model.named_modules()
              if is_linear(module) and module is not head and not name.startswith(tuple(wrapped))]
    if spec == "all-linear":
        chosen = linear
    elif isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ConfigError(f"{key}={spec!r} is not a valid regular expression: {exc}") from None
        chosen = [name for name in linear if pattern.fullmatch(name)]
    else:
        chosen = [name for name in linear if any(name == s or name.endswith("." + s) for s in spec)]
    if not chosen:
        raise ConfigError(_no_match(spec, linear, key))
    return chosen


def _no_match(spec: str | Sequence[str], linear: list[str], key: str) -> str:
    """What the model's linear layers are called, so the user can write a spec that matches."""
    suffixes = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linear))  # model order, no repeats
    shown = f"[{', '.join(spec)}]" if not isinstance(spec, str) else repr(spec)
    message = (f"{key}={shown} matched no module; the model's linear layers are named: "
               f"{', '.join(suffixes) or 'none'}")
    if linear:
        message += f" (full names like {linear[0]})"
    if isinstance(spec, str) and any(re.search(spec, name) for name in linear):
        # A bare suffix given as a string is a regex over *full* names, so `q_proj` alone matches nothing.
        return (f"{message}. A string is a regular expression that must match a full name; for suffixes "
                f"write a list, e.g. {key}=[{spec}], or match the whole name, e.g. '.*{spec}'.")
    return f"{message}. Use all-linear, a list of these suffixes, or a regular expression over full names."
