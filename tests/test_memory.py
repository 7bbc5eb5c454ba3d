"""model/memory.py: what the system says a process may allocate, read from fake /proc
and /sys files laid out as Linux lays them out (cgroup v2 and v1); training/memory.py:
whether a CPU run fits in that."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import memory
from model.config import ModelConfig
from model.kv_cache import KVCache
from server.__main__ import check_memory
from server.sampler import Sampler
from server.settings import Settings
from tests.test_training_pretrain import python_env
from training.memory import shortfall

GIB = 1024**3


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A /proc/meminfo with 8 GiB available and 1 GiB of free swap, at tmp_path."""
    (tmp_path / "meminfo").write_text(
        "MemTotal:       16777216 kB\nMemAvailable:    8388608 kB\nSwapFree:        1048576 kB\n"
    )
    monkeypatch.setattr(memory, "_MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(memory, "_OWN_CGROUPS", tmp_path / "cgroup")
    monkeypatch.setattr(memory, "_CGROUP_ROOT", tmp_path / "sys")
    return tmp_path


def limit(folder: Path, name: str, value: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(value + "\n")


def test_without_cgroup_files_the_machines_memory_and_swap_are_available(system: Path) -> None:
    assert memory.container_limit() is None
    assert memory.available_memory() == 9 * GIB


def test_a_cgroup_v2_limit_above_the_process_caps_its_memory_but_not_swap(system: Path) -> None:
    (system / "cgroup").write_text("0::/docker/abc\n")
    root = system / "sys"
    limit(root / "docker" / "abc", "memory.max", "max")
    limit(root / "docker", "memory.max", str(2 * GIB))  # the parent's limit holds too
    assert memory.container_limit() == 2 * GIB
    assert memory.available_memory() == 3 * GIB


def test_a_container_limit_above_what_the_machine_has_available_lowers_nothing(
    system: Path,
) -> None:
    (system / "cgroup").write_text("0::/\n")
    limit(system / "sys", "memory.max", str(32 * GIB))
    assert memory.container_limit() == 32 * GIB
    assert memory.available_memory() == 9 * GIB


def test_a_cgroup_v1_memory_controller_limit_is_read(system: Path) -> None:
    (system / "cgroup").write_text("5:cpu,cpuacct:/\n4:memory:/job\n0::/\n")
    limit(system / "sys" / "memory" / "job", "memory.limit_in_bytes", str(3 * GIB))
    limit(system / "sys" / "memory", "memory.limit_in_bytes", "9223372036854771712")
    assert memory.container_limit() == 3 * GIB
    assert memory.available_memory() == 4 * GIB


def test_a_limit_file_is_read_at_each_level_that_has_one_up_to_the_mount(system: Path) -> None:
    # cgroup v2 gives a cgroup memory.max only where its parent delegates the memory
    # controller: a level without the file is passed over, and the limits above it hold.
    # A memory.max above the mount belongs to no cgroup and is not read.
    (system / "cgroup").write_text("0::/user.slice/session/app\n")
    root = system / "sys"
    (root / "user.slice" / "session" / "app").mkdir(parents=True)
    limit(root / "user.slice", "memory.max", str(2 * GIB))
    limit(system, "memory.max", str(GIB))
    assert memory.container_limit() == 2 * GIB
    assert memory.available_memory() == 3 * GIB


def test_a_cgroup_path_holding_colons_is_read_whole(system: Path) -> None:
    # Kubernetes' systemd driver names a container's cgroup "<pod>.slice:cri-containerd:<id>":
    # only the first two colons of a /proc/self/cgroup line separate its fields.
    cgroup = "kubepods-pod1.slice:cri-containerd:abc"
    (system / "cgroup").write_text(f"0::/kubepods.slice/{cgroup}\n")
    limit(system / "sys" / "kubepods.slice" / cgroup, "memory.max", str(GIB))
    assert memory.container_limit() == GIB


def test_a_meminfo_that_cannot_be_read_as_numbers_says_nothing_is_known(system: Path) -> None:
    # As on a system without /proc/meminfo: no figure rather than a crash or a guess.
    (system / "meminfo").write_text("MemAvailable: lots kB\nSwapFree: 0 kB\n")
    assert memory.available_memory() is None
    (system / "meminfo").unlink()
    assert memory.available_memory() is None


def test_sizes_are_written_in_the_largest_binary_unit_they_reach() -> None:
    # The docstring's examples, and past the largest unit its multiples (no IndexError).
    assert memory.format_size(0) == "0.00 B"
    assert memory.format_size(1023) == "1,023.00 B"
    assert memory.format_size(1024) == "1.00 KiB"
    assert memory.format_size(3 * GIB // 2) == "1.50 GiB"
    assert memory.format_size(2**70) == "1,048,576.00 PiB"


def test_a_run_is_refused_only_past_what_is_available(system: Path) -> None:
    config = ModelConfig.from_preset("small", vocab_size=2048)  # ~11.4M parameters
    assert shortfall(config, "adamw") is None
    (system / "cgroup").write_text("0::/\n")
    limit(system / "sys", "memory.max", str(64 * 1024**2))  # 64 MiB + 1 GiB of swap
    assert shortfall(config, "adamw") is None
    (system / "meminfo").write_text("MemAvailable: 65536 kB\nSwapFree: 0 kB\n")
    # AdamW keeps two moments a parameter (16 bytes in all), Muon one (12).
    assert shortfall(config, "adamw") == (
        "the model (11.4M parameters: dim 384, 6 layers) needs at least 174.08 MiB of memory "
        "for its weights, gradients and adamw state, and at most 64.00 MiB is available: train "
        "a smaller model (--preset, --dim, --n-layers)"
    )
    assert shortfall(config, "muon", continued=True) == (
        "the model (11.4M parameters: dim 384, 6 layers) needs at least 130.56 MiB of memory "
        "for its weights, gradients and muon state, and at most 64.00 MiB is available: run "
        "it on a machine with more memory"
    )
    # Under torchrun each process holds a copy: what one needs, and what they need together.
    assert shortfall(config, "adamw", processes=2) == (
        "the model (11.4M parameters: dim 384, 6 layers) needs at least 174.08 MiB of memory "
        "for its weights, gradients and adamw state in each of 2 processes (348.15 MiB in "
        "all), and at most 64.00 MiB is available: train a smaller model (--preset, --dim, "
        "--n-layers)"
    )
    # 256 MiB: room for one process, not for two.
    limit(system / "sys", "memory.max", "max")
    (system / "meminfo").write_text("MemAvailable: 262144 kB\nSwapFree: 0 kB\n")
    assert shortfall(config, "adamw") is None
    assert "in each of 2 processes (348.15 MiB in all)" in shortfall(config, "adamw", processes=2)
    # Exactly what is needed is enough; a byte less is not.
    (system / "meminfo").write_text("MemAvailable: 16777216 kB\nSwapFree: 0 kB\n")
    needed = config.num_parameters() * 16
    limit(system / "sys", "memory.max", str(needed))
    assert shortfall(config, "adamw") is None
    limit(system / "sys", "memory.max", str(needed - 1))
    assert shortfall(config, "adamw") is not None
    # A model under a million parameters is counted in thousands.
    (system / "meminfo").write_text("MemAvailable: 8192 kB\nSwapFree: 0 kB\n")
    tiny = ModelConfig.from_preset("tiny", vocab_size=512)
    assert shortfall(tiny, "adamw").startswith(
        "the model (853.1K parameters: dim 128, 4 layers) needs at least 13.02 MiB"
    )


def test_a_run_is_never_refused_where_the_system_does_not_say_what_is_available(
    system: Path,
) -> None:
    # Not Linux (no /proc/meminfo): nothing to compare against, so the run goes ahead.
    (system / "meminfo").unlink()
    assert shortfall(ModelConfig.from_preset("small", vocab_size=2048), "adamw") is None


@pytest.mark.parametrize(
    ("vocab_size", "count"),
    [
        # dim 2, one layer: 2 * vocab_size + 28 parameters, so each unit's threshold exactly.
        (2, "32.0"),
        (499_986, "1.0M"),
        (499_999_986, "1.0B"),
        (499_999_999_999_986, "1,000.0T"),
    ],
)
def test_a_refused_models_parameters_are_counted_in_the_largest_unit_they_reach(
    system: Path, vocab_size: int, count: str
) -> None:
    (system / "meminfo").write_text("MemAvailable: 0 kB\nSwapFree: 0 kB\n")
    config = ModelConfig(
        vocab_size=vocab_size, dim=2, n_layers=1, n_heads=1, ffn_dim=1, max_seq_len=4
    )
    assert shortfall(config, "adamw").startswith(f"the model ({count} parameters: dim 2,")


@pytest.mark.parametrize(
    ("context", "max_batch", "remedy"),
    [
        # 18 KiB per slot and token (`small`, float32), and 3 KiB more while a step gathers
        # one of its 6 layers: 32 slots of 1,024 tokens fit in 9 GiB.
        (1024, 32, None),
        # One slot of 2^22 tokens needs 84 GiB: the context is what to lower.
        (2**22, 32, "lower --max-context to at most 13,952"),
        # 336 GiB: 13 slots of 2^15 tokens fit, or 512 slots of 863.
        (2**15, 512, "lower --max-batch to at most 13, or --max-context to at most 863"),
        # 256 GiB: a single slot of 400,000 tokens fits, which is still a remedy.
        (400_000, 32, "lower --max-batch to at most 1, or --max-context to at most 13,952"),
    ],
)
def test_the_server_refuses_a_kv_cache_past_what_is_available_saying_what_fits(
    system: Path, context: int, max_batch: int, remedy: str | None
) -> None:
    config = ModelConfig.from_preset("small", vocab_size=4096, max_seq_len=context)
    settings = Settings(checkpoint=system, max_batch=max_batch, dtype="float32")
    if remedy is None:
        check_memory(settings, {}, config, torch.device("cpu"))
        return
    with pytest.raises(ValueError, match="is available: ") as refused:
        check_memory(settings, {}, config, torch.device("cpu"))
    assert str(refused.value).endswith(f"is available: {remedy}"), refused.value
    # What it names is the most that fits: the check takes it, and refuses one more.
    for name, most in re.findall(r"--max-(batch|context) to at most ([\d,]+)", remedy):
        fits = int(most.replace(",", ""))
        for value in (fits, fits + 1):
            lowered = {"batch": max_batch, "context": context} | {name: value}
            config = ModelConfig.from_preset(
                "small", vocab_size=4096, max_seq_len=lowered["context"]
            )
            settings = Settings(checkpoint=system, max_batch=lowered["batch"], dtype="float32")
            if value == fits:
                check_memory(settings, {}, config, torch.device("cpu"))
                continue
            with pytest.raises(ValueError, match="is available: "):
                check_memory(settings, {}, config, torch.device("cpu"))


def test_the_server_refuses_weights_past_what_is_available_whatever_its_cache(
    system: Path,
) -> None:
    huge = ModelConfig.from_preset("base", vocab_size=4096).replace(dim=24576, n_layers=64)
    for dtype, remedy in (
        ("float32", "serve with --dtype bfloat16, or on a machine with more memory"),
        ("bfloat16", "serve on a machine with more memory"),
    ):
        settings = Settings(checkpoint=system, dtype=dtype)
        with pytest.raises(ValueError, match="the weights alone need") as refused:
            check_memory(settings, {}, huge, torch.device("cpu"))
        assert str(refused.value).endswith(remedy), refused.value


def test_weights_that_take_all_that_is_available_are_refused_as_the_weights_alone(
    system: Path,
) -> None:
    # No room at all is left for a cache: no --max-batch or --max-context could fit it.
    config = ModelConfig(vocab_size=2, dim=64, n_layers=1, n_heads=1, ffn_dim=1, max_seq_len=16)
    weights = config.num_parameters() * 4  # float32
    assert weights % 1024 == 0
    settings = Settings(checkpoint=system, max_batch=1, dtype="float32")
    for available, refused in ((weights, "the weights alone need"), (weights + 1024, "the KV")):
        (system / "meminfo").write_text(f"MemAvailable: {available // 1024} kB\nSwapFree: 0 kB\n")
        with pytest.raises(ValueError) as error:
            check_memory(settings, {}, config, torch.device("cpu"))
        assert str(error.value).startswith(refused), error.value


def test_the_server_never_names_a_context_too_short_to_serve_as_one_that_fits() -> None:
    # At --max-batch 1024 a model whose 1,024 slots take more than half of what is left
    # beside the weights per token of context: "lower --max-context to at most 1" was
    # the advice, and --max-context 1 is refused at start (no request fits in it).
    # A config of many 2-wide layers, sized from what this machine has available now:
    # the room beside its weights holds 1.5 tokens of context for every slot.
    available = memory.available_memory()
    assert available is not None  # Linux
    cache_per_layer = KVCache.bytes_per_token(
        ModelConfig(dim=2, n_layers=1, n_heads=1, ffn_dim=1, vocab_size=2), torch.float32
    )
    per_layer = 1024 * cache_per_layer * 3 // 2 + 26 * 4  # + a layer's 26 float32 weights
    config = ModelConfig(
        vocab_size=2, dim=2, n_layers=available // per_layer, n_heads=1, ffn_dim=1, max_seq_len=4
    )
    settings = Settings(checkpoint=Path("unused"), max_batch=1024, dtype="float32")
    with pytest.raises(ValueError, match="is available: ") as refused:
        check_memory(settings, {}, config, torch.device("cpu"))
    message = str(refused.value)
    # Fewer slots of that context fit: they are the advice, and only they.
    assert re.search(r"is available: lower --max-batch to at most [\d,]+$", message), message


def test_the_server_counts_the_weights_compile_decode_freezes_on_a_cpu() -> None:
    # --compile-decode on a CPU freezes a copy of the weights into each of its two graphs
    # (lone stream, larger batches), beside the model's own: weights of 45% of what is
    # available passed the check, and the start-up compile then asked for 135%.
    available = memory.available_memory()
    assert available is not None  # Linux
    weights = available * 45 // 100
    # Almost all of it one wide embedding: float32, 64 values a token.
    config = ModelConfig(
        vocab_size=weights // (4 * 64), dim=64, n_layers=1, n_heads=1, ffn_dim=1, max_seq_len=16
    )
    settings = Settings(checkpoint=Path("unused"), max_batch=2, dtype="float32")
    check_memory(settings, {}, config, torch.device("cpu"))  # the weights once: they fit
    compiled = settings.model_copy(update={"compile_decode": True})
    with pytest.raises(ValueError) as refused:
        check_memory(compiled, {}, config, torch.device("cpu"))
    message = str(refused.value)
    assert message.startswith("the weights alone need "), message
    assert "--compile-decode's two frozen copies" in message, message
    assert message.endswith(
        "serve without --compile-decode, with --dtype bfloat16, or on a machine with more memory"
    ), message
    # One slot: its decode is batch 1's graph alone, one frozen copy (90% in all: fits).
    lone = compiled.model_copy(update={"max_batch": 1})
    check_memory(lone, {}, config, torch.device("cpu"))
    larger = config.replace(vocab_size=config.vocab_size * 4 // 3)  # 60%, twice: 120%
    copy = "(the model's and --compile-decode's frozen copy)"
    with pytest.raises(ValueError, match=re.escape(copy)):
        check_memory(lone, {}, larger, torch.device("cpu"))


@pytest.mark.parametrize(
    ("max_batch", "dim", "vocab_per_byte", "positions_per_byte", "remedy"),
    [
        # 1,024 slots of a 4M-token vocabulary: the sampler's rows (a bool and a float32 a
        # token and slot) take 125% of what is available; the cache and weights ~0.2%.
        (1024, 2, 1 / 4096, 0, "lower --max-batch to at most"),
        # One slot of a one-layer, one-KV-head model: its RoPE tables (cos and sin a
        # position) take as much as its cache, 60% of what is available each.
        (1, 64, 0, 0.6 / 512, "lower --max-context to at most"),
    ],
)
def test_the_server_counts_what_start_up_zeroes_besides_the_weights_and_cache(
    max_batch: int, dim: int, vocab_per_byte: float, positions_per_byte: float, remedy: str
) -> None:
    available = memory.available_memory()
    assert available is not None  # Linux
    config = ModelConfig(
        vocab_size=max(2, int(available * vocab_per_byte)),
        dim=dim,
        n_layers=1,
        n_heads=1,
        ffn_dim=1,
        max_seq_len=max(2, int(available * positions_per_byte)),
    )
    settings = Settings(checkpoint=Path("unused"), max_batch=max_batch, dtype="float32")
    with pytest.raises(ValueError, match="is available: ") as refused:
        check_memory(settings, {}, config, torch.device("cpu"))
    message = str(refused.value)
    assert re.search(rf"is available: {remedy} [\d,]+$", message), message


# A server's parts at a full batch in a process of their own: what their tensors hold
# (weights, RoPE tables, KV cache, sampler rows), and how far the peak RSS grows over a
# decode step of every slot at the full context, its slots out of order (as a step's
# usually are) and sampling with a bias, penalties, top-k/top-p and log-probabilities.
STEP_PEAK = """
import json, sys, torch
from model.config import ModelConfig
from model.kv_cache import KVCache
from model.sampling import SamplingParams
from model.transformer import Transformer
from server.sampler import Sampler, make_generator

fields = json.loads(sys.argv[1])
config, batch_size = ModelConfig(**fields), 32
model = Transformer(config).eval()
cache = KVCache.for_model(config, batch_size)
cpu = torch.device("cpu")
sampler = Sampler(batch_size, config.vocab_size, cpu)
slots = list(reversed(range(batch_size)))
params = SamplingParams(
    temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.5,
    logit_bias=((3, 1.0),),
)
generators = [make_generator(slot, cpu) for slot in slots]
rows = sampler.batch(slots, [params] * batch_size, generators, [5] * batch_size)
for slot in slots:
    sampler.start(slot, [1, 2, 3])
for layer in (*cache.k, *cache.v):
    layer.fill_(0.5)  # written, as a serving cache is: zeroed pages take no memory
ids = torch.ones(batch_size, 1, dtype=torch.long)

def step(length):
    with torch.no_grad():
        positions = torch.full((batch_size, 1), length - 1)
        logits = model(ids, positions, cache, torch.tensor(slots), length=length)[:, -1]
        sampler.logprobs(logits, sampler.sample(logits, rows), 5)

def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))

step(2)  # the allocator and thread pools warmed by a short step
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak RSS (VmHWM) starts again from the RSS now
before = status("VmRSS:")
step(config.max_seq_len)
tensors = [*model.parameters(), *model.buffers(), *cache.k, *cache.v, sampler.in_prompt,
           sampler.generated]
print(json.dumps({"held": sum(t.nbytes for t in tensors), "step": status("VmHWM:") - before}))
"""


@pytest.mark.parametrize(
    "fields",
    [
        # Two layers, a long context: the layer's keys and values the step gathers are half
        # the cache again.
        {"vocab_size": 4096, "dim": 256, "n_layers": 2, "n_heads": 4, "max_seq_len": 1024},
        # A large vocabulary, a short context: the sampling's [batch, vocab] rows.
        {"vocab_size": 65536, "dim": 64, "n_layers": 2, "n_heads": 1, "max_seq_len": 16},
    ],
)
def test_the_server_counts_what_a_full_batchs_step_takes_beside_what_it_holds(
    system: Path, fields: dict
) -> None:
    # The check counted what start-up allocates: a 2-layer model whose cache filled what
    # was available grew 50% past it at its first full batch at the full context.
    measured = subprocess.run(
        [sys.executable, "-c", STEP_PEAK, json.dumps(fields | {"ffn_dim": 512})],
        capture_output=True,
        text=True,
        check=True,
        # A fixed mmap threshold: glibc's own rises to the largest block freed, so the
        # warm-up step's [batch, vocab] rows could stay resident and the measured step
        # take anywhere from their size to nothing (-0.1 MB once, on a 65,536 vocabulary).
        env=python_env() | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)},
    )
    used = json.loads(measured.stdout)
    assert used["step"] > 0, used
    config = ModelConfig(**fields, ffn_dim=512)
    settings = Settings(checkpoint=system, max_batch=32, dtype="float32")
    # A kB short of what the parts held and their step took: refused.
    available_kb = (used["held"] + used["step"]) // 1024 - 1
    (system / "meminfo").write_text(f"MemAvailable: {available_kb} kB\nSwapFree: 0 kB\n")
    with pytest.raises(ValueError, match="is available: lower --max-batch to at most"):
        check_memory(settings, {}, config, torch.device("cpu"))


def test_a_sampler_slot_holds_what_bytes_per_slot_counts_for_it() -> None:
    # check_memory reserves bytes_per_slot for each slot's token history (in_prompt and
    # generated): an undercount lets a server start that a full batch then overfills.
    vocab, slots = 1000, 3
    sampler = Sampler(slots, vocab, torch.device("cpu"))
    held = sampler.in_prompt.nbytes + sampler.generated.nbytes
    assert Sampler.bytes_per_slot(vocab) * slots == held
