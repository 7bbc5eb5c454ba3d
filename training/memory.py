"""Whether a CPU run fits in memory, asked before it starts.

Linux lets a process allocate more than the machine has (overcommit) and kills it when
the pages are touched: a model too large for the machine ended with exit 137 and no
word, after minutes of tokenizing. What a run holds for its whole life is known from
its shape: the weights, their gradients and the optimizer's state. The activations come
on top, so the check is a lower bound: it refuses only what cannot run.
"""

from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig

# float32 weights and gradients; AdamW keeps two moments a parameter, Muon one momentum
# (its AdamW groups, the embeddings and norms, two: the lower bound takes one).
_BYTES_PER_PARAMETER = {"adamw": 4 + 4 + 8, "muon": 4 + 4 + 4}
_CGROUP = Path("/sys/fs/cgroup")  # cgroup v2, as Docker and systemd mount it
_MEMINFO = Path("/proc/meminfo")


def format_size(size: int) -> str:
    """`size` bytes in binary units: 1,023.00 B, 1.50 GiB."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    power = min(len(units) - 1, (size.bit_length() - 1) // 10) if size > 0 else 0
    return f"{size / 1024**power:,.2f} {units[power]}"


def _meminfo() -> dict[str, int]:
    fields = {}
    for line in _MEMINFO.read_text().splitlines():
        name, _, value = line.partition(":")
        number, *unit = value.split()
        fields[name] = int(number) * (1024 if unit == ["kB"] else 1)
    return fields


def _cgroup_room(limit: str, usage: str, reclaimable: int = 0) -> int | None:
    """What a cgroup v2 limit leaves (limit file minus usage file, less what the kernel
    can reclaim), None without one."""
    try:
        cap = (_CGROUP / limit).read_text().strip()
        used = int((_CGROUP / usage).read_text())
    except (OSError, ValueError):
        return None
    return None if cap == "max" else max(0, int(cap) - used + reclaimable)


def _cgroup_file_cache() -> int:
    """The cgroup's page cache not in active use: its usage counts it, the kernel
    drops it before it kills."""
    try:
        stat = (_CGROUP / "memory.stat").read_text().split()
        return int(stat[stat.index("inactive_file") + 1])
    except (OSError, ValueError, IndexError):
        return 0


def available_memory() -> int | None:
    """Bytes this process can still allocate without being killed: the memory free or
    freeable (MemAvailable) plus free swap, within the cgroup's limits where a container
    sets them; None where the system does not say (not Linux)."""
    try:
        info = _meminfo()
        ram, swap = info["MemAvailable"], info["SwapFree"]
    except (OSError, KeyError, ValueError):
        return None
    if (room := _cgroup_room("memory.max", "memory.current", _cgroup_file_cache())) is not None:
        ram = min(ram, room)
    if (room := _cgroup_room("memory.swap.max", "memory.swap.current")) is not None:
        swap = min(swap, room)
    return ram + swap


def shortfall(config: ModelConfig, optimizer: str, processes: int = 1) -> str | None:
    """Why `processes` CPU runs of `config` cannot fit in this machine's memory, or None
    where they may (or the machine does not say)."""
    available = available_memory()
    parameters = config.num_parameters()
    needed = parameters * _BYTES_PER_PARAMETER[optimizer] * processes
    if available is None or needed <= available:
        return None
    ranks = f" in each of {processes} processes" if processes > 1 else ""
    count = f"{parameters / 1e9:,.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:,.1f}M"
    return (
        f"the model ({count} parameters: dim {config.dim}, "
        f"{config.n_layers} layers) needs at least {format_size(needed)} of memory for its "
        f"weights, gradients and {optimizer} state{ranks}, and {format_size(available)} is "
        "available: train a smaller model (--preset, --dim, --n-layers)"
    )
