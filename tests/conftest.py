"""Shared fixtures: a real byte-level BPE tokenizer and a real tiny checkpoint; and, for
a test module whose `base_url` fixture serves one, an httpx client of that server, the
openai SDK's and the id of the model it serves.

Both are built from text generated here (no files from outside tests/, no network).
Test modules may add their own fixtures; keep shared ones here.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
from tokenizers import Tokenizer

from model.checkpoint import save_checkpoint
from model.config import ModelConfig
from model.transformer import Transformer
from training.tokenizer import train_tokenizer

MIXED_TEXT = "Hello, world! 你好，世界。Emoji: 🙂🚀 — naïve café. The end."


def make_corpus(n_sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic English-like sentences plus some multi-byte text."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "my friend", "the old king", "our teacher", "a small bird"]
    verbs = ["sees", "likes", "finds", "reads", "follows", "writes to"]
    objects = ["the moon", "a letter", "the river", "every book", "the garden", "a song"]
    lines = [
        f"{rng.choice(subjects).capitalize()} {rng.choice(verbs)} {rng.choice(objects)}."
        for _ in range(n_sentences)
    ]
    lines += [MIXED_TEXT, "你好世界，今天天气很好。", "🙂🙂🚀 emoji test 🎉"] * 5
    return lines


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    return train_tokenizer(make_corpus(), vocab_size=512)


@pytest.fixture(scope="session")
def tiny_config(tokenizer: Tokenizer) -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=tokenizer.get_vocab_size())


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer, tiny_config
) -> Path:
    """A randomly initialised tiny model saved as a real checkpoint folder."""
    torch.manual_seed(1234)
    model = Transformer(tiny_config).eval()
    root = tmp_path_factory.mktemp("tiny-ckpt")
    return save_checkpoint(root, "step-0000000", model, tokenizer)


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def model_id(sdk: openai.OpenAI) -> str:
    [model] = sdk.models.list().data
    return model.id
