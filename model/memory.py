"""What the system says this process may yet allocate, asked before a large allocation.

Linux lets a process allocate more than the machine has (overcommit) and kills it when
the pages are touched: exit 137 and no word. The trainer (training/memory.py) and the
server (its KV cache) ask here first. What is available is the most the system may give
(free and reclaimable memory plus free swap, no more than a container's limit, the
memory others in it use not subtracted), so a check against it refuses only what cannot
run.
"""

from __future__ import annotations

from pathlib import Path

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
