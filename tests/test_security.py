"""Loading a model, an adapter or a checkpoint runs no code from it: weights come from safetensors only,
other state through torch.load(weights_only=True), model code only with model.trust_remote_code=true; and
no module of sftlab builds shell commands or evaluates strings."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_model_dir
from sftlab.cli import main
from sftlab.config import ModelConfig
from sftlab.errors import ConfigError
from sftlab.models import gguf
from sftlab.models import load as load_module
from sftlab.models.load import load_model, load_tokenizer
from sftlab.runs import load_for_inference

CPU = torch.device("cpu")
SRC = Path(__file__).resolve().parent.parent / "src" / "sftlab"


class Payload:
    """Unpickling this creates the file `marker`: proof that a loader ran code from a pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def malicious_pickle(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model.embed_tokens.weight": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("models") / "base")


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


def test_the_payload_does_run_when_unpickled(tmp_path) -> None:
    """The control: the malicious files below would create their marker if anything unpickled them."""
    control = tmp_path / "control"
    payload = malicious_pickle(tmp_path / "control.bin", control)
    torch.load(payload, weights_only=False)  # only here, on purpose
    assert control.exists()


def pickled_model_dir(base: Path, path: Path, marker: Path) -> Path:
    """The tiny model dir with its weights replaced by a malicious pytorch_model.bin."""
    shutil.copytree(base, path)
    (path / "model.safetensors").unlink()
    malicious_pickle(path / "pytorch_model.bin", marker)
    return path


def test_a_model_dir_with_only_pickled_weights_is_refused_with_the_conversion(base, tmp_path, marker) -> None:
    path = pickled_model_dir(base, tmp_path / "model", marker)
    with pytest.raises(ConfigError, match=r"holds its weights as pickles \(pytorch_model.bin\), not safetensors; "
                                          r"sftlab never unpickles weights.*python -c .*save_pretrained"):
        load_model(ModelConfig(path=str(path)), device=CPU)
    assert not marker.exists()


def test_transformers_itself_is_told_safetensors_only(base, tmp_path, marker, monkeypatch) -> None:
    """For a hub id sftlab cannot look inside first: from_pretrained gets use_safetensors=True and refuses."""
    path = pickled_model_dir(base, tmp_path / "model", marker)
    monkeypatch.setattr(load_module, "check_model_dir", lambda path: [])
    with pytest.raises(ConfigError, match="no file named model.safetensors"):
        load_model(ModelConfig(path=str(path)), device=CPU)
    assert not marker.exists()


def test_a_config_naming_a_pickled_weights_file_is_refused(base, tmp_path, marker) -> None:
    path = tmp_path / "model"
    shutil.copytree(base, path)
    malicious_pickle(path / "adapter_model.bin", marker)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    (path / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(ConfigError, match=r"transformers_weights=adapter_model.bin"):
        load_model(ModelConfig(path=str(path)), device=CPU)
    assert not marker.exists()


def test_the_gguf_conversion_cache_is_read_as_safetensors_only(base, tmp_path, marker, monkeypatch) -> None:
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf, "_convert",
                        lambda source, target, trust_remote_code: pickled_model_dir(base, target, marker))
    source = tmp_path / "model.gguf"
    source.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="holds its weights as pickles"):
        load_model(ModelConfig(path=str(source)), device=CPU)
    assert not marker.exists()


@pytest.fixture(scope="module")
def lora_run(base, tmp_path_factory) -> Path:
    """A finished two-step LoRA run dir (config.yaml, adapter/, checkpoints/step-1 and step-2)."""
    root = tmp_path_factory.mktemp("lora_run")
    data = root / "train.jsonl"
    row = {"messages": [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong."}]}
    data.write_text(json.dumps(row) + "\n", encoding="utf-8")
    config = root / "config.yaml"
    config.write_text(f"model: {base}\nmethod: lora\noutput_dir: {root / 'run'}\ndata:\n  train: {data}\n"
                      "  cache: false\nlora:\n  rank: 2\ntrain:\n  max_steps: 2\n  micro_batch_size: 1\n"
                      "  save_every_steps: 1\n",
                      encoding="utf-8")
    assert main(["train", str(config)]) == 0
    return root / "run"


def test_pickled_adapter_weights_are_refused_in_adapter_and_run_dirs(lora_run, tmp_path, marker) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    (run / "adapter" / "adapter_model.safetensors").unlink()
    malicious_pickle(run / "adapter" / "adapter_model.bin", marker)
    for source in (run, run / "adapter"):
        with pytest.raises(ConfigError, match=r"holds its adapter weights as pickles \(adapter_model.bin\).*"
                                              r"weights_only=True"):
            load_for_inference(str(source), device=CPU)
    assert not marker.exists()


def test_a_full_fine_tuning_run_dir_with_pickled_weights_is_refused(base, lora_run, tmp_path, marker) -> None:
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(lora_run / "config.yaml", run / "config.yaml")
    pickled_model_dir(base, run / "model", marker)
    with pytest.raises(ConfigError, match="holds its weights as pickles"):
        load_for_inference(str(run), device=CPU)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt"])
def test_resuming_from_a_checkpoint_with_a_pickle_payload_refuses(lora_run, tmp_path, marker, capsys, name) -> None:
    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    (run / "finished.json").unlink(missing_ok=True)  # as if killed after step 1
    shutil.rmtree(run / "checkpoints" / "step-2")
    checkpoint = run / "checkpoints" / "step-1"
    malicious_pickle(checkpoint / name, marker)
    try:
        code = main(["train", str(run / "config.yaml"), f"output_dir={run}"])
    finally:
        assert not marker.exists()  # whatever the error, the payload never ran
    assert code == 2
    assert f"checkpoint {checkpoint} cannot be read" in " ".join(capsys.readouterr().err.split())


# --- trust_remote_code ---------------------------------------------------------------------------------

def remote_code_dir(base: Path, path: Path, marker: Path, *, model_type: str) -> Path:
    """The tiny model dir plus an `auto_map` pointing at a local evil.py that creates `marker` on import."""
    shutil.copytree(base, path)
    (path / "evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                  "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
                                  "class EvilConfig(LlamaConfig):\n    model_type = 'evil'\n"
                                  "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
                                  "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n", encoding="utf-8")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig",
                                                   "AutoModelForCausalLM": "evil.EvilModel"})
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    return path


def test_remote_code_of_an_unknown_model_type_is_refused_by_default(base, tmp_path, marker) -> None:
    path = remote_code_dir(base, tmp_path / "evil", marker, model_type="evil")
    with pytest.raises(ConfigError, match="it ships its own Python code .* model.trust_remote_code=true"):
        load_model(ModelConfig(path=str(path)), device=CPU)
    load_tokenizer(str(path))  # the tokenizer class in tokenizer_config.json is a built-in one
    assert not marker.exists()


def test_remote_code_of_a_known_model_type_is_ignored_by_default(base, tmp_path, marker) -> None:
    path = remote_code_dir(base, tmp_path / "evil", marker, model_type="llama")
    model = load_model(ModelConfig(path=str(path)), device=CPU)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(load_tokenizer(str(path))).__name__ != "EvilTokenizer"
    assert not marker.exists()


def calls(tree: ast.AST) -> list[ast.Call]:
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call)]


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def test_every_hf_loader_call_passes_trust_remote_code_from_the_config() -> None:
    """Each from_pretrained / from_config in src/ names trust_remote_code, never as a literal True, and no
    function defaults it to True: transformers neither prompts nor runs model code unless the user said so."""
    found, wrong = 0, []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for call in calls(tree):
            func = call.func
            if isinstance(func, ast.Attribute) and func.attr in ("from_pretrained", "from_config"):
                found += 1
                value = keyword(call, "trust_remote_code")
                if value is None and not any(k.arg is None for k in call.keywords):  # **kwargs carry it
                    wrong.append(f"{path.relative_to(SRC)}:{call.lineno}: no trust_remote_code")
                if isinstance(value, ast.Constant) and value.value is True:
                    wrong.append(f"{path.relative_to(SRC)}:{call.lineno}: trust_remote_code=True")
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                names = [*node.posonlyargs, *node.args, *node.kwonlyargs]
                defaults = [*[None] * (len(node.posonlyargs) + len(node.args) - len(node.defaults)),
                            *node.defaults, *node.kw_defaults]
                wrong += [f"{path.relative_to(SRC)}:{arg.lineno}: trust_remote_code defaults to True"
                          for arg, default in zip(names, defaults)
                          if arg.arg == "trust_remote_code" and isinstance(default, ast.Constant) and default.value]
    assert found >= 4
    assert not wrong, "\n".join(wrong)


def test_a_hub_id_is_loaded_with_use_safetensors_and_a_pickle_only_repo_is_refused(monkeypatch) -> None:
    """transformers' own refusal (a hub repo without safetensors) becomes the same advice."""
    seen = {}

    def from_pretrained(cls, name, kwargs):  # stands in for the hub download
        seen.update(kwargs)
        raise OSError(f"{name} does not appear to have a file named model.safetensors or model.safetensors.index"
                      ".json and thus cannot be loaded with `safetensors`. Please do not set `use_safetensors=True`.")

    monkeypatch.setattr(load_module, "_from_pretrained", from_pretrained)
    with pytest.raises(ConfigError, match=r"'some-org/old-model': the repo has no safetensors weights, and sftlab "
                                          r"never unpickles weights .* if you trust the repo, convert it once"):
        load_model(ModelConfig(path="some-org/old-model"), device=CPU)
    assert seen["use_safetensors"] is True and seen["trust_remote_code"] is False


# --- no shell, no eval, no unpickling: a scan of every module ---------------------------------------

def qualified_names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it was imported as (`import subprocess as sp` gives sp -> subprocess)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update({a.asname or a.name.split(".")[0]: a.name if a.asname else a.name.split(".")[0]
                          for a in node.names})
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
    return names


def dotted(expr: ast.expr, names: dict[str, str]) -> str | None:
    if isinstance(expr, ast.Name):
        return names.get(expr.id, expr.id)
    if isinstance(expr, ast.Attribute):
        base = dotted(expr.value, names)
        return f"{base}.{expr.attr}" if base else None
    return None


def is_literal(expr: ast.expr | None, value: object) -> bool:
    return isinstance(expr, ast.Constant) and expr.value is value


FORBIDDEN = {"os.system", "os.popen", "os.execv", "os.execvp", "os.execl", "os.execlp", "os.spawnl", "os.spawnv",
             "pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads", "dill.load",
             "dill.loads", "cloudpickle.load", "cloudpickle.loads", "marshal.load", "marshal.loads", "shelve.open",
             "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "commands.getoutput"}
SAFE_YAML_LOADERS = ("SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader")


def unsafe_calls(source: str) -> list[str]:
    """Each call in `source` that runs a shell, evaluates a non-literal string, or unpickles."""
    tree = ast.parse(source)
    names = qualified_names(tree)
    problems = []
    for call in calls(tree):
        name = dotted(call.func, names) or ""
        where = f"line {call.lineno}: {name}"
        if name in FORBIDDEN:
            problems.append(where)
        elif name.startswith("subprocess.") and not (keyword(call, "shell") is None
                                                      or is_literal(keyword(call, "shell"), False)):
            problems.append(f"{where} with shell=")
        elif name in ("eval", "exec", "builtins.eval", "builtins.exec", "compile") and not (
                call.args and isinstance(call.args[0], ast.Constant)):
            problems.append(f"{where} of a non-literal")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
            if not (loader is not None and (dotted(loader, names) or "").endswith(SAFE_YAML_LOADERS)):
                problems.append(f"{where} without SafeLoader")
        elif name == "torch.load" and not is_literal(keyword(call, "weights_only"), True):
            problems.append(f"{where} without weights_only=True")
        elif name in ("numpy.load", "np.load") and not is_literal(keyword(call, "allow_pickle"), False) \
                and keyword(call, "allow_pickle") is not None:
            problems.append(f"{where} with allow_pickle")
    return problems


SCANNER_CASES = [
    ("import os\nos.system('ls ' + name)", "os.system"),
    ("from os import popen as p\np(cmd)", "os.popen"),
    ("import subprocess as sp\nsp.run(cmd, shell=True)", "subprocess.run with shell="),
    ("import subprocess\nsubprocess.check_output(cmd, shell=flag)", "subprocess.check_output with shell="),
    ("eval(text)", "eval of a non-literal"),
    ("exec(code, {})", "exec of a non-literal"),
    ("import pickle\npickle.loads(blob)", "pickle.loads"),
    ("from pickle import load\nload(f)", "pickle.load"),
    ("import yaml\nyaml.load(text)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml.load without SafeLoader"),
    ("import torch\ntorch.load(path)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(path, weights_only=False)", "torch.load without weights_only=True"),
    ("import numpy as np\nnp.load(path, allow_pickle=True)", "numpy.load with allow_pickle"),
]
SAFE_SOURCE = """
import subprocess, yaml, torch
subprocess.run(["git", "status"], check=True)
subprocess.run(["ls"], shell=False)
yaml.load(text, Loader=yaml.SafeLoader)
yaml.safe_load(text)
torch.load(path, weights_only=True, map_location="cpu")
eval("1 + 1")
"""


@pytest.mark.parametrize(("source", "problem"), SCANNER_CASES, ids=[c[1] for c in SCANNER_CASES])
def test_the_scanner_catches_each_unsafe_call(source, problem) -> None:
    assert [p.split(": ", 1)[1] for p in unsafe_calls(source)] == [problem]


def test_the_scanner_passes_safe_calls() -> None:
    assert unsafe_calls(SAFE_SOURCE) == []


OWN_PIPES = {"data/parallel.py": 5}
"""Modules allowed `pickle.loads`, and how many calls: data.num_workers' parent and worker processes exchange
batches, and the validating process its reader and verdict, over anonymous pipes between sftlab's own processes
(each started by the parent, with sftlab's code); no byte read from a file, the network or a user's input is
ever unpickled. A new call is a failure here."""


def test_no_module_runs_a_shell_evaluates_strings_or_unpickles() -> None:
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 30
    problems, pipes = [], {}
    for path in modules:
        name = path.relative_to(SRC).as_posix()
        for problem in unsafe_calls(path.read_text(encoding="utf-8")):
            if name in OWN_PIPES and problem.endswith(": pickle.loads"):
                pipes[name] = pipes.get(name, 0) + 1
            else:
                problems.append(f"{name} {problem}")
    assert not problems, "\n".join(problems)
    assert pipes == OWN_PIPES
