"""The engine's host memory policy (`ptserve.engine.hostmem`), in fresh processes: it is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ptserve.engine import hostmem
from tests.conftest import session_processes

# What a decoding pass on the CPU does in each layer, on the engine's thread: per group of rows (shortest
# first) it gathers their keys and values into new tensors of growing size (argv[2]: MiB), freed at the
# next group; argv[3] layers a pass, argv[4] passes.
BENCH_MODEL = "0.5,1,1.5,2,3,4,6,12"
PHI35_SHAPE = "13,26,52,100"  # a row's keys at 2,100 tokens are 12.4 MiB a layer at Phi-3.5's shape
PASSES = """
import resource, sys, threading, torch
from ptserve.engine import hostmem
if sys.argv[1] == "keep" and not hostmem.keep_freed_memory():
    print("unsupported")  # not glibc
    sys.exit()
def layer():
    out = torch.ones(3 << 18)
    for mb in map(float, sys.argv[2].split(",")):
        k = torch.ones(int(mb * (1 << 18)))
        v = torch.ones(int(mb * (1 << 18)))
        out += 1
faults = []
def engine():
    for _ in range(int(sys.argv[4])):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(int(sys.argv[3])):
            layer()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=engine)
thread.start()
thread.join()
print(*faults)
"""


def page_faults(
    mode: str, sizes: str = BENCH_MODEL, layers: int = 8, passes: int = 4, arena: str | None = None
) -> list[int]:
    """Page faults of each pass, in a fresh process; `arena`: its MALLOC_ARENA_MAX."""
    env = {k: v for k, v in os.environ.items() if k != hostmem.ARENA_VARIABLE}
    if arena is not None:
        env[hostmem.ARENA_VARIABLE] = arena
    command = [sys.executable, "-c", PASSES, mode, sizes, str(layers), str(passes)]
    done = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    if done.stdout.strip() == "unsupported":
        pytest.skip("mallopt is glibc's")
    return [int(n) for n in done.stdout.split()]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_pass_reuses_freed_memory_instead_of_faulting_pages_in_again():
    """Left to glibc's defaults, each pass's freed temporaries of megabytes go back to the kernel and the
    next pass faults them in again (57,000 page faults a decoding pass of 64 rows of varied lengths on the
    bench model: 180 ms instead of 89). Kept in the heap, only the first pass takes page faults."""
    kept, default = page_faults("keep"), page_faults("default")
    assert min(default[2:]) > 10_000
    assert kept[0] > 10_000 and max(kept[2:]) < 100  # the heap grows over the first passes, then serves them


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_at_phi35s_shape_the_engine_process_keeps_tens_of_mib_in_its_one_arena():
    """Temporaries of 13 to 100 MiB (Phi-3.5's shape: one decoding row's keys at 2,100 tokens are 12.4 MiB
    a layer) on a thread's own arena, whose heaps hold 64 MiB at most, kept faulting pages in at every pass
    (4 rows at 2,100 tokens on 4 of its layers: 101,000 faults, 325 ms instead of 130). With one arena, as
    the server's engine processes have, they are served from the heap once it has grown (it may still grow
    now and then: a block of 100 MiB needs that much contiguous free space)."""
    own = page_faults("keep", PHI35_SHAPE, layers=2, passes=8)
    one = page_faults("keep", PHI35_SHAPE, layers=2, passes=8, arena="1")
    assert min(own[2:]) > 50_000  # every pass: ~25,000 pages of 4 KiB are 100 MiB
    assert sorted(one[2:])[3] < 100  # most passes fault nothing
    assert sum(one[2:]) < min(own[2:])  # and all of them together less than any one pass on its own arena


def test_one_arena_is_set_for_processes_started_later_unless_the_user_chose():
    environ = {}
    hostmem.one_arena(environ)
    assert environ == {"MALLOC_ARENA_MAX": "1"}
    environ = {"MALLOC_ARENA_MAX": "4"}
    hostmem.one_arena(environ)
    assert environ == {"MALLOC_ARENA_MAX": "4"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_the_servers_engine_process_starts_with_one_arena(server):
    if "MALLOC_ARENA_MAX" in os.environ:  # the server would have it anyway: nothing to see
        pytest.skip("MALLOC_ARENA_MAX is set in the tests' environment")
    engines = []
    for pid, command in session_processes(server.proc.pid).items():
        if "multiprocessing.spawn" in command:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            engines.append(b"MALLOC_ARENA_MAX=1" in environ)
    assert engines == [True]


LOAD = """
import gc, sys
from pathlib import Path
from ptserve.config import load_config
from ptserve.engine import hostmem, loader
weights = str(Path(sys.argv[1]) / "model.safetensors")
overrides = {("model", "id"): sys.argv[1], ("server", "compile_decode"): sys.argv[2] == "unpacked"}
loaded = loader.load(load_config(None, environ={}, overrides=overrides))
gc.collect()
with open("/proc/self/maps") as maps:
    mapped = any(line.rstrip().endswith(weights) for line in maps)
print(mapped, hostmem.release_weight_files(loaded.model))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_model_packed_on_the_cpu_keeps_no_mapping_of_its_weight_file(tiny_model_dir):
    """transformers' tensors are views of the mapped safetensors file: once the linears are packed the
    embedding and norms left there kept the whole file mapped (at Phi-3.5's shape 7.2 GB resident beside the
    7.6 GB model). They are copied out and the mapping goes; a model whose weights are still the file's
    (not packed: server.compile_decode) stays mapped, served by the page cache."""
    outputs = {}
    for mode in ("packed", "unpacked"):
        run = subprocess.run(
            [sys.executable, "-c", LOAD, str(tiny_model_dir), mode], capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
        outputs[mode] = run.stdout.split()
    assert outputs == {"packed": ["False", "0"], "unpacked": ["True", "0"]}


BIASED = """
import gc, sys, torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM
from ptserve.engine import cpu_linear, hostmem
config = Qwen2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
Qwen2ForCausalLM(config).save_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()  # as saved: mapped
ids = torch.tensor([[1, 2, 3, 4]])
with torch.inference_mode():
    cpu_linear.pack_linears(model)
    want = model(ids).logits
    released = hostmem.release_weight_files(model)
    gc.collect()
    with open("/proc/self/maps") as maps:
        mapped = any(line.rstrip().endswith(".safetensors") for line in maps)
    print(released, mapped, torch.equal(model(ids).logits, want))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_packed_linears_with_biases_let_the_weight_file_go_too(tmp_path):
    """A model whose linears have biases (Qwen2's q/k/v): the packed layers' biases are buffers of theirs,
    copied out with the rest, so the mapping goes (as a plain attribute a bias kept it, unseen) and the
    logits stay what they were."""
    run = subprocess.run([sys.executable, "-c", BIASED, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["1", "False", "True"]


DROP = """
import re, sys, torch
from ptserve.engine import hostmem
def file_kb():
    return int(re.search(r"RssFile:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
path = sys.argv[1]
with open(path, "wb") as f:
    f.write(torch.arange(1 << 22, dtype=torch.int32).numpy().tobytes())  # 16 MiB
t = torch.from_file(path, shared=True, size=1 << 22, dtype=torch.int32)
total = int(t.sum())  # every page read
before = file_kb()
dropped = hostmem.drop_file_pages(t, hostmem.file_mappings(".safetensors"))
after = file_kb()
print(dropped, before - after >= 15 * 1024, int(t.sum()) == total)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_a_packed_weights_file_pages_leave_resident_memory(tmp_path):
    """A weight read from a mapped file to be packed: its pages leave the process's resident memory (16
    MiB of them here), and read again they come back from the file, the same values."""
    path = tmp_path / "weights.safetensors"
    run = subprocess.run([sys.executable, "-c", DROP, str(path)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True", "True"]
