"""Load a tokenizer (and, in the engine, a model) from a local Hugging Face dir or a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlab.errors import ConfigError
from sftlab.models.gguf import is_gguf, model_dir_for

if TYPE_CHECKING:
    import torch

    from sftlab.config import ModelConfig


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer from a local model/tokenizer dir or a hub id; errors say what to fix."""
    from transformers import AutoTokenizer

    if is_gguf(name_or_path):
        name_or_path = model_dir_for(name_or_path, trust_remote_code=trust_remote_code)
    local = Path(name_or_path).expanduser()
    if local.exists() and not local.is_dir():
        raise ConfigError(f"model {name_or_path!r} is a file; expected a Hugging Face model or tokenizer "
                          "directory (with tokenizer.json / tokenizer_config.json) or a hub id.")
    if local.is_dir() and not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                   "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{local} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                          "tokenizer.model or vocab.json); point --model/model at the model's directory.")
    try:
        return AutoTokenizer.from_pretrained(str(local) if local.is_dir() else name_or_path,
                                             trust_remote_code=trust_remote_code)
    except OSError as exc:
        offline = " (the Hugging Face Hub is not reachable from here)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"cannot load a tokenizer from {name_or_path!r}{offline}: {exc}") from None


def resolve_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """`auto`: bfloat16 on a CUDA GPU that supports it, float32 otherwise."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> "torch.device":
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: "ModelConfig", *, device: "torch.device | None" = None) -> Any:
    """A causal LM from a local HF dir, a hub id, or a .gguf file (dequantised by transformers)."""
    from transformers import AutoModelForCausalLM

    if not model.path:
        raise ConfigError("no model given: set model (a Hugging Face model dir, hub id or .gguf file).")
    device = device or default_device()
    dtype = resolve_dtype(model.dtype, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model.trust_remote_code}
    if model.attn_implementation != "auto":
        kwargs["attn_implementation"] = model.attn_implementation
    source = Path(model.path).expanduser()
    if is_gguf(model.path):  # converted once into a cached HF dir (models/gguf.py)
        source = Path(model_dir_for(model.path, trust_remote_code=model.trust_remote_code))
    elif source.exists() and not (source / "config.json").is_file():
        raise ConfigError(f"{source} has no config.json; expected a Hugging Face model directory "
                          "(config.json + *.safetensors), a hub id, or a .gguf file.")
    name = str(source) if source.exists() else model.path
    from sftlab.models.quant import quiet_loggers

    try:
        # transformers imports torchao (when installed) on load; on CPU it logs missing CUDA kernels.
        with quiet_loggers("torchao", "torch.utils._pytree"):
            loaded = _from_pretrained(AutoModelForCausalLM, name, kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load model {model.path!r}: {exc}") from None
    return loaded.to(device)


def _from_pretrained(cls: Any, name: str, kwargs: dict[str, Any]) -> Any:
    """transformers ≥ 4.56 names the dtype argument `dtype`; older releases only know `torch_dtype`."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.56"):
        kwargs = dict(kwargs)
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    return cls.from_pretrained(name, **kwargs)


def load_for_inference(path: str, *, device: "torch.device | None" = None,
                       base: str | None = None) -> tuple[Any, Any, Any, Any]:
    """(model, tokenizer, chat template, method or None) from a run dir (its adapter/ or model/), a
    PEFT-format adapter dir (on its base model, or `base`), or a plain HF model dir / hub id."""
    from sftlab import export
    from sftlab.config import load_config
    from sftlab.data.templates import load_template
    from sftlab.methods import METHODS

    root = Path(path).expanduser()
    cfg, adapter = None, None
    if (root / "config.yaml").is_file() and ((root / "adapter").is_dir() or (root / "model").is_dir()):
        cfg = load_config(root / "config.yaml", [f"model={base}"] if base else [])
        if (root / "model").is_dir():  # full fine-tuning: a plain model dir
            return load_for_inference(str(root / "model"), device=device)
        adapter = root / "adapter"
    elif (root / export.ADAPTER_CONFIG).is_file():
        base_path, overrides = export.adapter_settings(root)
        if not (base or base_path):
            raise ConfigError(f"{root} names no base model; pass --base PATH.")
        cfg = load_config(overrides=[*overrides, f"model={base or base_path}"])
        adapter = root
    if cfg is None:
        from sftlab.config import ModelConfig

        model = load_model(ModelConfig(path=path), device=device)
        tokenizer = load_tokenizer(path)
        return model, tokenizer, load_template("auto", tokenizer), None
    tokenizer = load_tokenizer(str(adapter))  # saved with the run: holds any added tokens and the template
    model = load_model(cfg.model, device=device)
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    # Rows of tokens added for training (from the adapter's trainable_token_indices) are loaded too.
    method = METHODS[cfg.method](cfg, trainable_token_ids=export.adapter_token_ids(adapter))
    method.apply(model)
    export.load_trained(model, method, adapter)
    model.eval()
    return model, tokenizer, load_template("auto", tokenizer), method
