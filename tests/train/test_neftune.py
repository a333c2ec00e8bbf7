"""NEFTune (train.neftune_alpha): uniform noise of scale alpha / sqrt(L·d) on the input embeddings in training
mode only; a run with it resumes to the uninterrupted weights; preference stages and bad values are refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from rich.console import Console

from conftest import tiny_model_dir, write_qa_chats
from sftlab.config import load_config
from sftlab.errors import ConfigError
from sftlab.models.load import load_model
from sftlab.runs import prepare, train
from sftlab.train.checkpoint import latest_checkpoint
from sftlab.train.neftune import add_embedding_noise

QUIET = Console(quiet=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model"), init_range=0.2)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    pairs = [("What is the capital of France?", "Paris."), ("What is 2+2?", "Four."), ("Say hi.", "Hi there!"),
             ("Who wrote Hamlet?", "Shakespeare wrote it."), ("Name a prime number.", "Seven.")]
    return write_qa_chats(tmp_path_factory.mktemp("data") / "qa.jsonl", pairs)


def test_noise_is_uniform_of_the_papers_scale_in_training_mode_only(model_dir) -> None:
    cfg = load_config(overrides=[f"model={model_dir}", "model.dtype=float32"])
    model = load_model(cfg.model, device=torch.device("cpu"))
    embedding = model.get_input_embeddings()
    ids = torch.randint(0, model.config.vocab_size, (2, 300), generator=torch.Generator().manual_seed(0))
    clean = embedding(ids).detach()
    handle = add_embedding_noise(model, 5.0)
    model.train()
    torch.manual_seed(3)
    noisy = embedding(ids).detach()
    noise = noisy - clean
    scale = 5.0 / math.sqrt(ids.shape[1] * clean.shape[-1])
    assert noise.abs().max() <= scale * (1 + 1e-5)
    assert noise.abs().max() > 0.99 * scale and abs(noise.mean()) < 0.02 * scale  # uniform on [-s, s]
    assert noise.std() == pytest.approx(scale / math.sqrt(3), rel=0.03)
    torch.manual_seed(3)
    assert torch.equal(embedding(ids).detach(), noisy)  # torch's generator: seeded, so a resume redraws it
    assert not torch.equal(embedding(ids).detach(), noisy)  # a new draw each forward
    model.eval()
    assert torch.equal(embedding(ids).detach(), clean)  # evaluation, the probe and generation: clean
    handle.remove()
    model.train()
    assert torch.equal(embedding(ids).detach(), clean)


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf"])
def test_a_bad_alpha_is_refused_naming_the_key(value) -> None:
    with pytest.raises(ConfigError, match=r"train\.neftune_alpha must be a (positive|finite) number"):
        load_config(overrides=[f"train.neftune_alpha={value}"])


def test_preference_stages_refuse_it() -> None:
    with pytest.raises(ConfigError, match=r"train\.neftune_alpha is set, but stage is dpo"):
        load_config(overrides=["stage=dpo", "train.neftune_alpha=5"])


class Kill(Exception):
    pass


def test_a_run_with_noise_trains_otherwise_and_resumes_to_the_uninterrupted_weights(model_dir, data, tmp_path) -> None:
    def config(out: Path, *extra: str):
        return load_config(overrides=[f"model={model_dir}", f"data.train={data}", f"output_dir={out}",
                                      "data.cache=false", "method=lora", "train.max_steps=5",
                                      "train.save_every_steps=2", "train.micro_batch_size=2", "train.lr=5e-3",
                                      "eval.probe=none", *extra])

    def weights(out: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(latest_checkpoint(out) / "trainable.safetensors")

    def kill_at_3(step: int) -> None:
        if step == 3:
            raise Kill()

    train(prepare(config(tmp_path / "clean"), console=QUIET), console=QUIET)
    train(prepare(config(tmp_path / "whole", "train.neftune_alpha=10"), console=QUIET), console=QUIET)
    with pytest.raises(Kill):
        train(prepare(config(tmp_path / "killed", "train.neftune_alpha=10"), console=QUIET), console=QUIET,
              on_step=kill_at_3)
    assert latest_checkpoint(tmp_path / "killed").name == "step-2"  # step 3's noise is drawn again
    train(prepare(config(tmp_path / "killed", "train.neftune_alpha=10"), console=QUIET), console=QUIET)
    clean, whole, resumed = weights(tmp_path / "clean"), weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert not all(torch.equal(whole[name], clean[name]) for name in whole)  # the noise changed the training
