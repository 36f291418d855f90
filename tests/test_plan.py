"""The CPU memory plan inside a memory cgroup: fake /proc/self/cgroup and /sys/fs/cgroup trees."""

from pathlib import Path

import psutil
import pytest
import torch

from moe_edge.errors import ConfigError
from moe_edge.offload.plan import available_memory, cgroup_headroom, slots_for

MiB = 2**20
CPU = torch.device("cpu")


def _files(folder: Path, **files: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text + "\n")


def _proc(tmp_path: Path, *lines: str) -> Path:
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text("\n".join(lines) + "\n")
    return proc


def _v1(tmp_path, limit: str, usage: str, stat: str = "total_inactive_file 0\n"):
    group = tmp_path / "sys" / "memory" / "docker" / "abc"
    _files(group, memory_limit_in_bytes=limit, memory_usage_in_bytes=usage, memory_stat=stat)
    _files(group.parent.parent, memory_limit_in_bytes=str(2**63 - 4096), memory_usage_in_bytes="1")
    return tmp_path / "sys", _proc(tmp_path, "12:pids:/docker/abc", "4:memory:/docker/abc", "0::/")


def _v2(tmp_path, limit: str, current: str, stat: str = "anon 1\ninactive_file 0\n"):
    group = tmp_path / "sys" / "system.slice" / "app.service"
    _files(group, memory_max=limit, memory_current=current, memory_stat=stat)
    _files(group.parent, memory_max="max", memory_current=current)
    return tmp_path / "sys", _proc(tmp_path, "0::/system.slice/app.service")


def test_v1_limit_minus_usage(tmp_path):
    root, proc = _v1(tmp_path, str(1400 * MiB), str(400 * MiB))
    assert cgroup_headroom(root, proc) == 1000 * MiB
    assert available_memory(CPU, root, proc) == min(psutil.virtual_memory().available, 1000 * MiB)


def test_v1_reclaimable_page_cache_is_not_used_memory(tmp_path):
    stat = "cache 300\ninactive_file 5\ntotal_inactive_file 314572800\n"
    root, proc = _v1(tmp_path, str(1400 * MiB), str(400 * MiB), stat)
    assert cgroup_headroom(root, proc) == 1300 * MiB  # 300 MiB of inactive file cache is room


def test_v2_limit_minus_usage_and_inactive_file(tmp_path):
    root, proc = _v2(tmp_path, str(2048 * MiB), str(1024 * MiB), f"anon 7\ninactive_file {24 * MiB}\n")
    assert cgroup_headroom(root, proc) == 1048 * MiB


def test_a_parent_group_limit_counts(tmp_path):
    root, proc = _v2(tmp_path, "max", str(100 * MiB))
    _files(root / "system.slice", memory_max=str(612 * MiB), memory_current=str(200 * MiB))
    assert cgroup_headroom(root, proc) == 412 * MiB


def test_container_sees_its_own_group_at_the_mount_root(tmp_path):
    # no cgroup namespace: /proc names the host's path, the container's group is the root
    _files(tmp_path / "sys" / "memory", memory_limit_in_bytes=str(512 * MiB),
           memory_usage_in_bytes=str(12 * MiB))
    proc = _proc(tmp_path, "4:cpuacct,memory:/docker/0123abcd")
    assert cgroup_headroom(tmp_path / "sys", proc) == 500 * MiB


@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_no_limit_plans_from_the_host(tmp_path, layout):
    root, proc = (_v1(tmp_path, str(2**63 - 4096), str(400 * MiB)) if layout == "v1"
                  else _v2(tmp_path, "max", str(400 * MiB)))
    assert cgroup_headroom(root, proc) is None
    host = psutil.virtual_memory().available
    assert abs(available_memory(CPU, root, proc) - host) < 256 * MiB  # the host moves a little


def test_no_cgroup_files_at_all(tmp_path):
    assert cgroup_headroom(tmp_path / "sys", tmp_path / "missing") is None
    assert cgroup_headroom(tmp_path / "sys", _proc(tmp_path, "0::/a/b", "4:memory:/c")) is None


@pytest.mark.parametrize("limit,usage", [("lots", str(MiB)), (str(512 * MiB), "")])
def test_malformed_files_fall_back_to_the_host(tmp_path, limit, usage):
    root, proc = _v2(tmp_path, limit, usage)
    with pytest.warns(UserWarning, match="memory plan leaves this cgroup out"):
        assert cgroup_headroom(root, proc) is None


def test_malformed_proc_lines_are_skipped(tmp_path):
    root, proc = _v1(tmp_path, str(1400 * MiB), str(400 * MiB), "total_inactive_file x\n")
    proc.write_text("garbage\n\n4:memory:/docker/abc\n")
    assert cgroup_headroom(root, proc) == 1000 * MiB  # an unreadable memory.stat frees nothing


def test_auto_plans_within_the_group(tmp_path):
    root, proc = _v1(tmp_path, str(1400 * MiB), str(400 * MiB))
    seen = available_memory(CPU, root, proc)
    slots, margin, _ = slots_for("auto", device=CPU, resident=100 * MiB, kv=20 * MiB,
                                 expert_bytes=MiB, moe_layers=27, experts=64, top_k=6,
                                 available=seen)
    assert (seen, margin) == (1000 * MiB, 256 * MiB)
    assert slots == (1000 - 100 - 20 - 256) // 27 == 23  # the host's free memory would give 64


def test_kv_cache_is_planned_for_no_more_positions_than_the_model_has():
    from moe_edge.config import config_from_dict
    from moe_edge.offload.plan import kv_cache_bytes
    from moe_edge.testing import deepseek_config
    config = config_from_dict(deepseek_config(max_position_embeddings=2048))
    per_token = kv_cache_bytes(config, 1, torch.float32)
    assert kv_cache_bytes(config, 4096, torch.float32) == 2048 * per_token
    assert kv_cache_bytes(config, 1000, torch.float32) == 1000 * per_token


def test_auto_on_a_cpu_lends_the_kv_caches_later_growth_to_the_experts():
    """The KV cache of the first tokens is planned; the rest of a full context's goes to
    slots now, and the slots left at a full context still hold top-k."""
    from moe_edge.offload.plan import make_plan
    row = 27 * MiB
    kw = dict(device=CPU, slow_tier="disk", resident=100 * MiB, kv=200 * MiB, expert_bytes=MiB,
              moe_layers=27, experts=64, top_k=6, available=1000 * MiB)
    full = make_plan("auto", kv_start=None, **kw)
    lent = make_plan("auto", kv_start=25 * MiB, **kw)
    assert full.slots_per_layer == (1000 - 100 - 200 - 256) // 27 == 16 and full.kv_start_bytes is None
    assert lent.slots_per_layer == (1000 - 100 - 25 - 256) // 27 == 22
    held = 1000 * MiB - 100 * MiB - 256 * MiB - 22 * row  # the KV cache's at load, slack included
    assert lent.kv_start_bytes == held and 25 * MiB <= held < 25 * MiB + row
    assert lent.slots_at_full_context == 22 - -(-(200 * MiB - held) // row) == full.slots_per_layer
    assert "KV cache" in lent.describe() and "down to 16 slots per layer" in lent.describe()
    # a size or share names the expert cache itself: the KV cache is planned beside it, whole
    assert make_plan("50%", kv_start=25 * MiB, **kw).kv_start_bytes is None
    with pytest.raises(ConfigError, match="too small"):  # top-k must fit at a full context
        make_plan("auto", kv_start=25 * MiB, **{**kw, "kv": 500 * MiB})


def test_kv_start_only_where_a_slot_can_give_its_memory_back():
    from moe_edge.config import config_from_dict
    from moe_edge.offload.plan import KV_START_TOKENS, kv_cache_bytes, kv_start_bytes
    from moe_edge.testing import deepseek_config
    config = config_from_dict(deepseek_config(max_position_embeddings=4096))
    assert kv_start_bytes(config, 4096, torch.bfloat16, CPU) == kv_cache_bytes(config, KV_START_TOKENS, torch.bfloat16)
    assert kv_start_bytes(config, 100, torch.bfloat16, CPU) == kv_cache_bytes(config, 100, torch.bfloat16)
    assert kv_start_bytes(config, 4096, torch.bfloat16, torch.device("cuda")) is None
