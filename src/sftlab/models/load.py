"""Load a tokenizer (and, in the engine, a model) from a local Hugging Face dir or a hub id.

Weights are read only from safetensors files: a dir whose weights are pickled (`pytorch_model.bin`,
`*.pt`) is refused with the command that converts it, because unpickling a file can run any code in it.
A local dir is checked before transformers sees it (config.json parses, every weight file named exists
and is a whole safetensors file), so a broken download is reported by file name, not as a traceback.
Model code shipped with a checkpoint (`auto_map`) runs only with model.trust_remote_code=true.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sftlab.errors import ConfigError
from sftlab.models.gguf import is_gguf, model_dir_for

if TYPE_CHECKING:
    import torch

    from sftlab.config import ModelConfig
    from sftlab.models.stream import Nf4Spec


SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "*.bin", "*.pt", "*.pth", "*.ckpt")
"""Weight files that are (or index) pickles: never loaded, refused with the way to convert them."""
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
"""What the Hugging Face Hub accepts as a repo id: `name` or `org/name`."""


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    """A transformers tokenizer from a local model/tokenizer dir or a hub id; errors say what to fix."""
    from transformers import AutoTokenizer

    if is_gguf(name_or_path):
        name_or_path = model_dir_for(name_or_path, trust_remote_code=trust_remote_code)
    local = local_dir(name_or_path, what="tokenizer")
    if local is not None and not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                                                     "tokenizer.model", "vocab.json")):
        raise ConfigError(f"{local} holds no tokenizer files (tokenizer.json, tokenizer_config.json, "
                          "tokenizer.model or vocab.json); point --model/model at the model's directory.")
    if local is not None and (local / "config.json").is_file():
        _check_config_json(local / "config.json")  # transformers reads it to pick the tokenizer class
    if local is not None:
        _check_tokenizer_files(local, full=False)
    try:
        return AutoTokenizer.from_pretrained(str(local) if local else name_or_path,
                                             trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # huggingface_hub's HFValidationError is a ValueError
        if local is not None:
            _check_tokenizer_files(local, full=True)  # a corrupt file, named as such (not "Hub unreachable")
        raise ConfigError(_load_failure("a tokenizer", name_or_path, exc)) from None


TOKENIZER_JSON = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                  "vocab.json")
"""The JSON files a tokenizer dir may hold; a damaged one is named before transformers blames the Hub."""


def _check_tokenizer_files(local: Path, *, full: bool) -> None:
    """Raise a ConfigError naming a tokenizer JSON file in `local` that is cut short (it must end with `}`:
    reading its last bytes costs nothing, and an interrupted download or copy fails it) or, with `full`, that
    does not parse (a full parse costs ~1 s for a 30 MB tokenizer.json, so only after a failed load)."""
    for name in TOKENIZER_JSON:
        file = local / name
        if not file.is_file():
            continue
        size = file.stat().st_size
        with file.open("rb") as handle:
            handle.seek(max(0, size - 64))
            tail = handle.read().rstrip()
        problem = None if tail.endswith(b"}") else f"it ends without the closing }} ({size:,} bytes): cut short"
        if problem is None and full:
            try:
                json.loads(file.read_bytes())
            except (ValueError, UnicodeDecodeError) as exc:
                where = f"line {exc.lineno}, column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) \
                    else str(exc)
                problem = f"it is not valid JSON ({where})"
        if problem:
            raise ConfigError(f"{file} is corrupt: {problem}, e.g. by an interrupted download or copy. Download or "
                              "copy the model's tokenizer files again.")


def local_dir(name_or_path: str, *, what: str = "model") -> Path | None:
    """The local directory `name_or_path` names, or None when it names no local path but is a plausible
    hub id (`name` or `org/name`); an error for a file, or for a path that is neither."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"model {name_or_path!r} is a file; expected a Hugging Face {what} directory "
                          "(config.json, model.safetensors, tokenizer files), a hub id or a .gguf file. "
                          f"Point model at the directory that holds it ({path.resolve().parent}).")
    if HUB_ID.fullmatch(name_or_path) and ".." not in name_or_path and "--" not in name_or_path:
        return None
    raise ConfigError(f"model {name_or_path!r}: no such directory ({path.resolve()}), and not a hub id "
                      "(`org/name`). Expected a local Hugging Face model dir (config.json + model.safetensors), "
                      "a hub id such as Qwen/Qwen2.5-0.5B-Instruct, or a .gguf file; fix model (or --model).")


def check_model(name_or_path: str, *, trust_remote_code: bool = False) -> Path | None:
    """The local model dir that `name_or_path` (a dir, a .gguf file, a hub id) loads from, checked as
    `check_model_dir` does; None for a hub id (transformers checks what it downloads). Cheap: call it
    before long work that a broken model would waste."""
    if is_gguf(name_or_path):  # converted once into a cached HF dir (models/gguf.py)
        source: Path | None = Path(model_dir_for(name_or_path, trust_remote_code=trust_remote_code))
    else:
        source = local_dir(name_or_path)
    if source is not None:
        check_model_dir(source)
    return source


def check_model_dir(path: Path) -> list[Path]:
    """The safetensors weight files of the local model dir `path`, after checking that config.json parses
    and that each file exists and is whole; an error names the file and how to fix it."""
    _check_config_json(path / "config.json")
    if (path / SAFE_INDEX).is_file():
        files = _indexed_shards(path / SAFE_INDEX)
    elif (path / SAFE_WEIGHTS).is_file():
        files = [path / SAFE_WEIGHTS]
    else:
        pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern)})
        if pickled:
            raise ConfigError(pickled_weights_refusal(path, pickled))
        others = sorted(p.name for p in path.glob("*.safetensors"))
        found = f"only {', '.join(others)}" if others else "no weight files"
        raise ConfigError(f"{path} has config.json but {found}; expected {SAFE_WEIGHTS} (or {SAFE_INDEX} and its "
                          "shards). The download or copy is incomplete: fetch the model's weight files again.")
    for file in files:
        check_safetensors(file)
    return files


def pickled_weights_refusal(path: Path, names: list[str]) -> str:
    """The message refusing pickled weights in `path`, with a command that converts them."""
    return (f"{path} holds its weights as pickles ({', '.join(names)}), not safetensors; sftlab never unpickles "
            "weights (a pickle can run any code when loaded). If you trust where this model came from, convert "
            "it once: python -c \"from transformers import AutoModelForCausalLM as M; "
            f"M.from_pretrained('{path}').save_pretrained('{path}')\" (writes {SAFE_WEIGHTS}), or use a "
            "release of the model that ships safetensors.")


def check_safetensors(file: Path) -> None:
    """Raise a ConfigError naming `file` unless it is a complete safetensors file (header and data)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass  # the header parses and its tensors cover the file exactly
    except (SafetensorError, OSError) as exc:
        size = file.stat().st_size if file.exists() else 0
        raise ConfigError(f"{file} is not a readable safetensors file ({exc}; {size:,} bytes): it is truncated "
                          "or corrupt, e.g. an interrupted download or copy. Download or copy it again.") from None


def _check_config_json(file: Path) -> None:
    if not file.is_file():
        raise ConfigError(f"{file.parent} has no config.json; expected a Hugging Face model directory "
                          f"(config.json + {SAFE_WEIGHTS}), a hub id, or a .gguf file.")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno}: {exc.msg})" if isinstance(exc, json.JSONDecodeError) else ""
        raise ConfigError(f"{file} is not valid JSON{where}; expected the model's Hugging Face config. "
                          "Restore it from the model's source (download or copy it again).") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file} holds a JSON {type(config).__name__}; expected an object (the model's "
                          "Hugging Face config). Restore it from the model's source.")
    named = config.get("transformers_weights")  # transformers then loads that file instead of model.safetensors
    if named is not None and not str(named).endswith((".safetensors", ".safetensors.index.json")):
        raise ConfigError(pickled_weights_refusal(file.parent, [f"transformers_weights={named}"]))


def _indexed_shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{index} is not a valid safetensors index ({type(exc).__name__}: {exc}); expected "
                          "JSON with a weight_map of tensor name -> shard file. Download or copy it again.") from None
    missing = [name for name in names if not (index.parent / name).is_file()]
    if missing:
        raise ConfigError(f"{index} names {len(names)} shard files, and these are missing from "
                          f"{index.parent}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. "
                          "The download or copy is incomplete: fetch the missing shards again.")
    return [index.parent / name for name in names]


def _load_failure(what: str, name: str, exc: Exception) -> str:
    """The message for transformers failing to load `what` from `name` (a hub id or a checked dir)."""
    text = str(exc).replace("Please do not set `use_safetensors=True`.", "").strip()
    if "trust_remote_code" in text:
        return (f"cannot load {what} from {name!r}: it ships its own Python code (auto_map in its config), "
                "which sftlab runs only with model.trust_remote_code=true; set that only if you trust its "
                f"source, or use a model type transformers knows. ({text.splitlines()[0]})")
    text = " ".join(text.split())
    offline = " (the Hugging Face Hub is not reachable from here)" if os.environ.get("HF_HUB_OFFLINE") else ""
    local = "" if Path(name).expanduser().exists() else f" There is no local directory {name!r} either."
    if "safetensors" in text and "does not appear to have" in text:
        return (f"cannot load {what} from {name!r}: the repo has no safetensors weights, and sftlab never "
                "unpickles weights (.bin). Use a revision that ships model.safetensors, or, if you trust the "
                "repo, convert it once into a local dir and set model to that dir: python -c \"from transformers "
                "import AutoModelForCausalLM as M, AutoTokenizer as T; d = 'converted'; "
                f"M.from_pretrained('{name}').save_pretrained(d); T.from_pretrained('{name}').save_pretrained(d)\"")
    return f"cannot load {what} from {name!r}{offline}: {text}{local}"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a CUDA GPU that supports it, float32 otherwise."""
    import torch

    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model: ModelConfig, *, device: torch.device | None = None, nf4: Nf4Spec | None = None,
               notes: list[str] | None = None) -> Any:
    """A causal LM from a local HF dir, a hub id, or a .gguf file (dequantised by transformers), its
    weights read from safetensors only, streamed tensor by tensor onto `device` (models/stream.py): the
    whole model never passes through host memory at once. `nf4`: QLoRA's decoder linear layers are
    quantised as they are read (their weights equal quantising after a full load, bit for bit). A
    checkpoint that cannot be streamed loads through from_pretrained as before; why is appended to `notes`."""
    from transformers import AutoModelForCausalLM

    if not model.path:
        raise ConfigError("no model given: set model (a Hugging Face model dir, hub id or .gguf file).")
    device = device or default_device()
    dtype = resolve_dtype(model.dtype, device)
    source = check_model(model.path, trust_remote_code=model.trust_remote_code)
    streamed, why = _load_streaming(model, source, dtype=dtype, device=device, nf4=nf4)
    if streamed is not None:
        return streamed
    if notes is not None:
        notes.append(f"model loaded whole through transformers, not streamed: {why}")
    # use_safetensors: never fall back to pickled pytorch_model.bin (local dirs are refused earlier, with
    # the reason; this covers hub ids).
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": model.trust_remote_code,
                              "use_safetensors": True}
    if model.attn_implementation != "auto":
        kwargs["attn_implementation"] = model.attn_implementation
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError

    from sftlab.models.quant import TORCHAO_LOGGERS, quiet_loggers

    # Mismatched shapes are reported (not raised deep inside transformers) and refused below, with the
    # tensors that are missing: transformers would start those at random and train on.
    kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        # transformers imports torchao (when installed) on load; on CPU it logs missing CUDA kernels.
        # Its load report (missing / mismatched tensors) is refused below in sftlab's words; quieting it also
        # switches on a tensor-parallel plan check that logs, so that one is quieted too.
        with quiet_loggers(*TORCHAO_LOGGERS, "transformers.modeling_utils",
                           "transformers.distributed.tensor_parallel"):
            loaded, loading = _from_pretrained(AutoModelForCausalLM, str(source) if source else model.path, kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(_load_failure("model", model.path, exc)) from None
    except StrictDataclassError as exc:  # transformers' own config checks (e.g. num_hidden_layers vs layer_types)
        where = source / "config.json" if source else model.path
        raise ConfigError(f"{where} is inconsistent: {' '.join(str(exc).split())}. The config does not describe "
                          "these weights: restore the config.json saved with them.") from None
    check_coverage(loading, source, model.path)
    return loaded.to(device)


def model_source(model: ModelConfig) -> tuple[Path | None, str | None]:
    """The checked local dir the model's weights stream from — a local dir, the dir a .gguf file converts
    to, or the hub snapshot of a hub id (downloaded, or from the cache) — or (None, why not)."""
    source = check_model(model.path, trust_remote_code=model.trust_remote_code)
    if source is None:
        source = _hub_snapshot(model.path)
        if source is None:
            return None, f"no local snapshot of hub id {model.path!r}"
        try:
            check_model_dir(source)
        except ConfigError as exc:
            return None, str(exc)
    return source, None


def _load_streaming(model: ModelConfig, source: Path | None, *, dtype: torch.dtype, device: torch.device,
                    nf4: Nf4Spec | None) -> tuple[Any, str | None]:
    """(the streamed model, None), or (None, why it was not streamed)."""
    from sftlab.models import stream
    from sftlab.models.quant import TORCHAO_LOGGERS, quiet_loggers

    if source is None:
        source, why = model_source(model)
        if source is None:
            return None, why
    files = stream.weight_files(source)
    missing = [f.name for f in files if not f.is_file()]
    if missing:  # from_pretrained names what is wrong in its own words (and is told safetensors only)
        return None, f"{', '.join(missing)} not found in {source}"
    tensors = stream.checkpoint_tensors(files)
    try:
        with quiet_loggers(*TORCHAO_LOGGERS):
            skeleton = stream.skeleton(source, dtype=dtype, trust_remote_code=model.trust_remote_code,
                                       attn_implementation=model.attn_implementation)
    except Exception as exc:  # broad on purpose: from_pretrained reports any of these in sftlab's words (below)
        return None, f"the model cannot be built from {source / 'config.json'} ({type(exc).__name__}: {exc})"
    why = stream.stream_plan(skeleton, tensors)
    if why is not None:
        return None, why
    with quiet_loggers(*TORCHAO_LOGGERS):  # torchao's import logs its CUDA-only kernels
        return stream.fill(skeleton, tensors, device=device, nf4=nf4), None


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot dir of a hub model's config and safetensors files (downloaded once, as
    from_pretrained would; from the cache when offline), or None when it cannot be had."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # broad on purpose: any failure: from_pretrained then reports it in its own words
        return None


def check_coverage(loading: dict[str, Any], source: Path | None, name: str) -> None:
    """Refuse a model whose checkpoint does not cover what its config.json describes: a tensor the weights
    lack would start at random (a config claiming 3 layers for 2 trains a random third), and one whose shape
    differs is not these weights. `loading` is transformers' loading report: it already knows tied weights
    (lm_head shared with the embeddings), buffers and its own checkpoint-name conversions, so those never
    false-alarm. Tensors the checkpoint holds beyond what the config describes (a config claiming fewer layers,
    or extras some checkpoints ship, e.g. multi-token-prediction layers) are not refused, but said on stderr:
    the model is then built without them."""
    config = source / "config.json" if source else f"the config of {name}"
    weights = _weights_name(source, name)
    mismatched = sorted(loading.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        key, found, wanted = mismatched[0]
        more = f" (and {len(mismatched) - 1} more tensors)" if len(mismatched) > 1 else ""
        raise ConfigError(f"{config} does not match the weights: tensor {key} has shape {_shape(found)} in "
                          f"{_file_of(source, key) or weights}, but the config describes {_shape(wanted)}{more}. "
                          "config.json was edited or comes from another model: restore the config.json saved "
                          "with these weights (or point model at the directory they belong to).")
    missing = sorted(loading.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ConfigError(f"{config} describes {len(missing)} tensors that {weights} does not hold ({shown}); they "
                          f"would start at random and train as if loaded.{_layer_hint(source, missing)} Restore the "
                          "config.json saved with these weights (or point model at the directory they belong to).")
    unused = sorted(loading.get("unexpected_keys") or ())
    if unused:
        shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
        print(f"warning: {weights} holds {len(unused)} tensors that {config} does not describe ({shown}); the model "
              "is built without them. If the config was edited, restore the one saved with the weights.",
              file=sys.stderr, flush=True)


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


def _weights_name(source: Path | None, name: str) -> str:
    if source is None:
        return f"the weights of {name}"
    if (source / SAFE_INDEX).is_file():
        return f"{source / SAFE_INDEX} (and its shards)"
    return str(source / SAFE_WEIGHTS)


def _file_of(source: Path | None, key: str) -> str | None:
    """The weight file of a local dir that holds tensor `key` (a sharded checkpoint: its index says)."""
    if source is None:
        return None
    if (source / SAFE_INDEX).is_file():
        try:
            shard = json.loads((source / SAFE_INDEX).read_text(encoding="utf-8"))["weight_map"].get(key)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        return str(source / shard) if shard else None
    return str(source / SAFE_WEIGHTS)


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def _layer_hint(source: Path | None, missing: list[str]) -> str:
    """' The weights hold layers 0-1; config.json describes layers up to 2.' when the missing tensors are
    whole decoder layers the checkpoint does not have (read from the safetensors headers)."""
    wanted = {int(m.group(1)) for key in missing if (m := _LAYER.search(key))}
    if source is None or not wanted:
        return ""
    from safetensors import safe_open

    held: set[int] = set()
    for file in check_model_dir(source):
        with safe_open(str(file), framework="pt") as handle:
            held |= {int(m.group(1)) for key in handle.keys() if (m := _LAYER.search(key))}  # noqa: SIM118 - a safe_open handle is no mapping
    if not held or min(wanted) <= max(held):
        return ""
    return (f" The weights hold {max(held) + 1} layers (0-{max(held)}); the config describes "
            f"{max(wanted) + 1} (num_hidden_layers or n_layer).")


def _from_pretrained(cls: Any, name: str, kwargs: dict[str, Any]) -> Any:
    """transformers ≥ 4.56 names the dtype argument `dtype`; older releases only know `torch_dtype`."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("4.56"):
        kwargs = dict(kwargs)
        kwargs["torch_dtype"] = kwargs.pop("dtype")
    return cls.from_pretrained(name, **kwargs)


def skeleton(model: ModelConfig) -> Any:
    """The model's modules with every weight on the meta device, built from config.json alone (no weights
    read, no memory): enough to check layer names and shapes before the real load. None for a .gguf file, a
    hub id, or an architecture that cannot be built this way (the checks then run on the loaded model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.models.quant import TORCHAO_LOGGERS, quiet_loggers

    source = local_dir(model.path) if model.path and not is_gguf(model.path) else None
    if source is None:
        return None
    try:
        config = AutoConfig.from_pretrained(str(source), trust_remote_code=model.trust_remote_code)
        # the first model built imports transformers' quantizers, and with them torchao (when installed), which
        # logs its CUDA-only kernels on a CPU machine: noise before the run's first line
        with torch.device("meta"), quiet_loggers(*TORCHAO_LOGGERS):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    except Exception:  # broad on purpose: only an early check: the real load reports what is wrong
        return None
