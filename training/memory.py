"""Whether a CPU run fits in memory, asked before it starts.

Linux lets a process allocate more than the machine has (overcommit) and kills it when
the pages are touched: a model too large for the machine ended with exit 137 and no
word, after minutes of tokenizing. What a run holds for its whole life is known from
its shape: the weights, their gradients and the optimizer's state. Both sides of the
comparison lean towards running: the activations come on top of what is counted, and
what is available is the most the system may give (free and reclaimable memory plus
free swap, no more than a container's limit, the memory others in it use not
subtracted). It refuses only what cannot run.
"""

from __future__ import annotations

from pathlib import Path

from model.config import ModelConfig

# float32 weights and gradients; AdamW keeps two moments a parameter, Muon one momentum
# (its AdamW groups, the embeddings and norms, two: the lower bound takes one).
_BYTES_PER_PARAMETER = {"adamw": 4 + 4 + 8, "muon": 4 + 4 + 4}
_MEMINFO = Path("/proc/meminfo")
_OWN_CGROUPS = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


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


def _limits_up_from(mount: Path, cgroup: str, limit_file: str) -> list[int]:
    """The memory limits of `cgroup` and of each cgroup above it that `mount` shows."""
    limits = []
    folder = mount / cgroup.strip("/")
    for level in (folder, *folder.parents):
        if not level.is_relative_to(mount):
            break
        try:
            text = (level / limit_file).read_text().strip()
        except OSError:
            continue
        if text != "max":  # v2's "no limit"; v1 writes a huge number instead
            limits.append(int(text))
    return limits


def container_limit() -> int | None:
    """The lowest memory limit on this process's cgroup and those above it (cgroup v2,
    or v1's memory controller), None where none is set or none can be read."""
    try:
        lines = _OWN_CGROUPS.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, cgroup = line.split(":", 2)
        # Where each version mounts the memory controller, and its limit file.
        if controllers == "":  # the v2 hierarchy
            mount, limit_file = _CGROUP_ROOT, "memory.max"
        elif "memory" in controllers.split(","):
            mount, limit_file = _CGROUP_ROOT / "memory", "memory.limit_in_bytes"
        else:
            continue
        limits += _limits_up_from(mount, cgroup, limit_file)
    return min(limits, default=None)


def available_memory() -> int | None:
    """The most this process may yet allocate without being killed: MemAvailable (free
    and reclaimable RAM) no more than a container's limit, plus free swap; None where
    the system does not say (not Linux)."""
    try:
        info = _meminfo()
        ram, swap = info["MemAvailable"], info["SwapFree"]
    except (OSError, KeyError, ValueError):
        return None
    if (limit := container_limit()) is not None:
        ram = min(ram, limit)
    return ram + swap


def shortfall(
    config: ModelConfig, optimizer: str, processes: int = 1, continued: bool = False
) -> str | None:
    """Why `processes` CPU runs of `config` cannot fit in this machine's memory, or None
    where they may (or the machine does not say); `continued`: the shape is a
    checkpoint's (--resume, --init-from), not the command line's."""
    available = available_memory()
    parameters = config.num_parameters()
    needed = parameters * _BYTES_PER_PARAMETER[optimizer] * processes
    if available is None or needed <= available:
        return None
    ranks = f" in each of {processes} processes" if processes > 1 else ""
    scale, unit = next((s, u) for s, u in ((1e12, "T"), (1e9, "B"), (1e6, "M")) if parameters >= s)
    count = f"{parameters / scale:,.1f}{unit}"
    remedy = (
        "run it on a machine with more memory"
        if continued
        else "train a smaller model (--preset, --dim, --n-layers)"
    )
    return (
        f"the model ({count} parameters: dim {config.dim}, {config.n_layers} layers) needs "
        f"at least {format_size(needed)} of memory for its weights, gradients and "
        f"{optimizer} state{ranks}, and at most {format_size(available)} is available: "
        f"{remedy}"
    )
