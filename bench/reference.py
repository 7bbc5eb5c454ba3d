"""The references our numbers are compared against, measured in the same process.

- `hf_generate`: Hugging Face transformers `LlamaForCausalLM.generate` on the same
  checkpoint folder (static batch, sampling).
- `plain_train_steps`: a nanoGPT-style loop (forward, cross-entropy, backward, AdamW
  step) on the identical model, batch and sequence length.
"""

from __future__ import annotations

import threading
import time
import typing
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.timing import frozen_heap, synchronize
from model.transformer import Transformer

if typing.TYPE_CHECKING:  # transformers: an optional import, made by hf_model
    from transformers import LlamaForCausalLM

# Set by a benchmark's signal handler (bench/cli.py): a running `hf_generate` stops at
# its next token. It runs on a thread the process waits for (model/cpu.py), and a
# Ctrl-C or SIGTERM waited for the whole reference run, the server left running meanwhile.
STOP_REFERENCE = threading.Event()


def hf_model(folder: Path, dtype: torch.dtype) -> LlamaForCausalLM:
    """HF's model of the checkpoint, generating with only what `hf_generate` passes.

    `generate` fills every setting it is not given from the folder's
    generation_config.json: a checkpoint carrying e.g. repetition_penalty or
    no_repeat_ngram_size from the model it was fine-tuned from would have made HF do
    work our engine, given the benchmark's sampling settings, does not. Only the token
    ids are kept."""
    from transformers import GenerationConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder, dtype=dtype)
    ids = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=ids.bos_token_id, eos_token_id=ids.eos_token_id, pad_token_id=ids.pad_token_id
    )
    return model


@torch.inference_mode()
def hf_generate(
    folder: Path,
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    temperature: float,
    top_p: float,
    device: torch.device,
    dtype: torch.dtype,
    repeats: int = 1,
) -> float:
    """Tokens/s of HF `generate` making exactly `new_tokens` for each row of `prompts` [B, T]
    (cut short once STOP_REFERENCE is set: the process is ending, the number means nothing)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class OnStop(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            rows = input_ids.shape[0]
            return torch.full((rows,), STOP_REFERENCE.is_set(), device=input_ids.device)

    model = hf_model(folder, dtype).to(device).eval()
    prompts = prompts.to(device)
    mask = torch.ones_like(prompts)

    def run() -> None:
        if STOP_REFERENCE.is_set():
            return
        model.generate(
            prompts,
            attention_mask=mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=new_tokens,
            # End-of-text ignored as our engine ignores it (ignore_eos): sampled as any
            # token, nothing done for it. min_new_tokens instead masked it out each step
            # (two logits processors and a stopping check: 3-7% of a tiny model's step).
            eos_token_id=None,
            pad_token_id=model.config.eos_token_id,
            stopping_criteria=StoppingCriteriaList([OnStop()]),
        )

    run()  # warm-up: allocator, kernels, lazy init
    synchronize(device)
    with frozen_heap():
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        synchronize(device)
        elapsed = time.perf_counter() - start
    return repeats * prompts.shape[0] * new_tokens / elapsed


def plain_train_steps(
    model: Transformer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    grad_accum: int = 1,
) -> float:
    """Tokens/s of the simplest correct training loop over `batches` (x, y each [B, T]),
    in fp32 or under `autocast_dtype` autocast (nanoGPT's own loop autocasts on CUDA).
    The optimizer steps once per `grad_accum` batches (micro-batches, their gradients
    accumulated, as nanoGPT's loop and the trainer's `--grad-accum` do); the first step's
    are warm-up.

    On CUDA its fp32 matrix products run as the trainer's do: TF32, which the trainer
    turns on for its whole process (training/trainer.py), as nanoGPT does. Left at
    torch's default, a "float32" loop against a float32 trainer compared TF32 products
    with full fp32 ones."""
    precision = torch.get_float32_matmul_precision()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    try:
        return _timed_steps(
            model, batches, device=device, autocast_dtype=autocast_dtype, grad_accum=grad_accum
        )
    finally:
        torch.set_float32_matmul_precision(precision)


def _timed_steps(
    model: Transformer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    grad_accum: int,
) -> float:
    model.train().to(device)
    # nanoGPT's AdamW settings; its speed, not where it leads, is measured.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    seq = batches[0][0].shape[1]
    positions = torch.arange(seq, device=device)[None]

    def step(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for x, y in micro_batches:
            x, y = x.to(device), y.to(device)
            autocast = autocast_dtype is not None
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast):
                logits = model(x, positions.expand_as(x))
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), y.reshape(-1))
            (loss / grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = [batches[i : i + grad_accum] for i in range(0, len(batches), grad_accum)]
    step(steps[0])  # warm-up
    synchronize(device)
    with frozen_heap():
        start = time.perf_counter()
        for micro_batches in steps:
            step(micro_batches)
        synchronize(device)
        elapsed = time.perf_counter() - start
    return sum(x.numel() for x, _ in batches) / elapsed
