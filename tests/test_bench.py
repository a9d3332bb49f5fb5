"""The speed table and the asv suite run and report sane numbers (never how fast)."""

import importlib.util
import json
import math
import mmap
import pathlib
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastbn import bench

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITE = ROOT / "asv_benchmarks" / "benchmarks"

ROW_FIELDS = {"op", "layout", "shape", "dtype", "threads", "elements", "itemsize",
              "floor_bytes", "fastbn_s", "copy_s", "samples", "reference_s", "torch_s",
              "torch_cuda_s", "cudnn_s", "gbps", "copy_gbps", "efficiency",
              "speedup_reference", "speedup_torch", "fastbn_faults", "torch_faults",
              "rounds", "round_times"}


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_bench_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    status = bench.main(["--quick", "--no-torch", "--shapes", "4x8x6x6,16x24",
                         "--dtypes", "float32,float16", "--threads", "1,2", "--repeat", "2",
                         "--json", str(path)])
    assert status == 0
    out = capsys.readouterr().out
    assert "copy bandwidth" in out and "forward-train" in out and "backward" in out

    data = json.loads(path.read_text())
    assert set(data["copy_bandwidth_gbps"]) == {"1", "2"}
    assert all(_positive(v) for v in data["copy_bandwidth_gbps"].values())
    assert data["machine"]["cores"] >= 1 and data["machine"]["fastbn_threads"] >= 1
    rows = data["rows"]
    # 4-D: 4 ops x 2 layouts; rank 2 has one memory layout: 4 ops; x 2 dtypes x 2 threads.
    assert len(rows) == (4 * 2 + 4) * 2 * 2
    assert {r["op"] for r in rows} == set(bench.OPS)
    for r in rows:
        assert set(r) == ROW_FIELDS
        for key in ("fastbn_s", "copy_s", "gbps", "copy_gbps", "efficiency", "reference_s",
                    "speedup_reference"):
            assert _positive(r[key]), (key, r)
        assert r["torch_s"] is None and r["speedup_torch"] is None
        factor = 3 if r["op"] in ("backward", "backward-eval") else 2
        assert r["floor_bytes"] == factor * r["elements"] * r["itemsize"]
        assert r["elements"] == math.prod(r["shape"])


def test_bench_table_marks_missing_contenders(capsys):
    assert bench.main(["--quick", "--no-torch", "--no-reference", "--shapes", "4x8x6x6",
                       "--ops", "forward-infer", "--layouts", "nhwc", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = [line for line in lines if line.startswith("forward-infer")]
    assert len(row) == 1 and row[0].count("—") == 3        # ×ref, ×torch, torch


def _row(fastbn_s, torch_s, copy_s, faults=0.0, reference_s=None):
    return bench.Row(op="backward", layout="nchw", shape=(2, 3), dtype="float32", threads=1,
                     elements=6, itemsize=4, floor_bytes=72, fastbn_s=fastbn_s, copy_s=copy_s,
                     samples=5, reference_s=reference_s, torch_s=torch_s,
                     fastbn_faults=faults, torch_faults=0.0)


def test_rounds_report_the_median_of_each_contender():
    """A busy round moves a contender's time in that round only."""
    row = bench._merge([_row(1e-6, 3e-6, 4e-6, reference_s=9e-6),
                        _row(5e-6, 3.5e-6, 40e-6, faults=2.0),
                        _row(2e-6, 30e-6, 5e-6)])
    assert (row.fastbn_s, row.torch_s, row.copy_s) == (2e-6, 3.5e-6, 5e-6)
    assert row.speedup_torch == pytest.approx(1.75) and row.rounds == 3
    assert row.reference_s == 9e-6 and row.speedup_reference == pytest.approx(4.5)
    assert row.fastbn_faults == 0.0
    assert [t["fastbn_s"] for t in row.round_times] == [1e-6, 5e-6, 2e-6]
    # a contender missing from a round has no median
    assert bench._merge([_row(1e-6, None, 4e-6), _row(2e-6, 3e-6, 4e-6)]).torch_s is None
    single = _row(1e-6, 3e-6, 4e-6)
    assert bench._merge([single]) is single and single.round_times is None


def test_bench_rounds_in_the_json_and_the_table(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert bench.main(["--quick", "--no-torch", "--shapes", "4x8x6x6", "--ops",
                       "forward-train,backward", "--layouts", "nchw", "--threads", "1",
                       "--repeat", "2", "--rounds", "3", "--json", str(path)]) == 0
    assert "median over 3 rounds" in capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["options"]["rounds"] == 3 and len(data["rows"]) == 2
    for r in data["rows"]:
        assert r["rounds"] == 3 and len(r["round_times"]) == 3
        for key in ("fastbn_s", "copy_s"):
            assert r[key] == sorted(t[key] for t in r["round_times"])[1]
        assert _positive(r["reference_s"])      # timed in the first round


def test_round_robin_rotates_the_order_and_samples_each_its_count():
    """Contenders share inputs, so none may always run right after the same one."""
    calls = []

    def sampler(name, value):
        def sample():
            calls.append(name)
            return value
        return sample

    med = bench.round_robin({"a": (sampler("a", 1.0), 4), "b": (sampler("b", 2.0), 4),
                             "c": (sampler("c", 3.0), 2)})
    assert med == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert calls == ["a", "b", "c", "b", "c", "a", "a", "b", "a", "b"]


def test_round_robin_counts_the_page_faults_of_each_contender():
    """A contender that writes fresh memory in its timed calls is seen doing so: the
    table then says that its time includes the allocator's."""
    pytest.importorskip("resource")
    pages = 64

    def fresh():                        # a new anonymous mapping each call, every page written
        m = mmap.mmap(-1, pages * mmap.PAGESIZE)
        for i in range(pages):
            m[i * mmap.PAGESIZE] = 1
        m.close()

    def quiet():
        return None

    fresh_sample, quiet_sample = bench.sampler(fresh, 0.0), bench.sampler(quiet, 0.0)
    faults = {}
    bench.round_robin({"fresh": (fresh_sample, 5), "quiet": (quiet_sample, 5)}, faults)
    assert faults["fresh"] >= pages and faults["quiet"] < 1
    row = bench.Row(op="backward", layout="nchw", shape=(2, 3), dtype="float32", threads=1,
                    elements=6, itemsize=4, floor_bytes=72, fastbn_s=1e-6, copy_s=1e-6,
                    samples=5, torch_s=2e-6, fastbn_faults=faults["quiet"],
                    torch_faults=faults["fresh"])
    info = {"fastbn": "x", "cpu": "cpu", "cores": 1, "fastbn_threads": 1, "openmp": True,
            "numpy": "x", "torch": "x", "cuda_device": None, "load_average_start": 0,
            "load_average_end": 0}
    text = bench.table([row], {1: 1.0}, info)
    assert f"backward nchw 2x3 float32 1 thr: torch {faults['fresh']:.0f} per call" in text
    assert "fastbn" not in text.split("page faults")[1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_lets_a_large_block_be_reused_without_page_faults():
    """torch's backward allocates dx on every call; by default glibc maps a 48 MiB
    block anew each time (one fault per 4 KiB page), and after keep_freed_memory it
    reuses the freed one.  Run apart: mallopt changes the whole process."""
    code = textwrap.dedent("""
        import ctypes, resource
        from fastbn import bench
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
        libc.free.argtypes = (ctypes.c_void_p,)
        n = 48 << 20
        def faults_per_call(calls=4):
            p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)     # warm-up
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(calls):
                p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)
            return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
        default = faults_per_call()
        what = bench.keep_freed_memory()
        print(default, faults_per_call(), what is not None, bench.keep_freed_memory() == what)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    default, kept = float(out[0]), float(out[1])
    pages = (48 << 20) // mmap.PAGESIZE
    assert default >= pages // 2, out        # (huge pages, if the kernel gives them, fault less)
    assert kept < 16 and out[2:] == ["True", "True"], out


def test_bench_parses_shapes_of_rank_2_to_5():
    opts = bench.parse_args(["--shapes", "8x4,2x3x5,2x3x4x5,2x3x4x5x6", "--threads", "2,1,2"])
    assert opts.shapes == [(8, 4), (2, 3, 5), (2, 3, 4, 5), (2, 3, 4, 5, 6)]
    assert opts.threads == [1, 2]


@pytest.mark.parametrize("argv", [["--shapes", "4"], ["--shapes", "2x3x4x5x6x7"],
                                  ["--shapes", "4x0x2"], ["--shapes", "4xax2"],
                                  ["--ops", "sideways"], ["--threads", "0"],
                                  ["--dtypes", "int8"], ["--repeat", "0"],
                                  ["--rounds", "0"]])
def test_bench_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(argv)


def _suite_module(name):
    """Import asv_benchmarks/benchmarks/<name>.py as part of its package (relative imports)."""
    if not (SUITE / "__init__.py").exists():
        pytest.skip("asv suite not present")
    pkg = "fastbn_asv_suite"
    if pkg not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            pkg, SUITE / "__init__.py", submodule_search_locations=[str(SUITE)])
        sys.modules[pkg] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[pkg])
    return importlib.import_module(f"{pkg}.{name}")


def _benchmark_classes(module):
    return [c for n, c in vars(module).items()
            if isinstance(c, type) and not n.startswith("_") and hasattr(c, "params")]


@pytest.mark.parametrize("name", ["forward", "inference", "backward", "stats"])
def test_asv_suite_runs_once_on_cpu(name):
    """Every benchmark method runs once on the cpu backend with the smallest parameters,
    and the gpu backend is skipped (NotImplementedError in setup) where there is no GPU."""
    module = _suite_module(name)
    classes = _benchmark_classes(module)
    assert classes
    for cls in classes:
        first = [values[0] for values in cls.params]
        backend_at = cls.param_names.index("backend")
        assert first[backend_at] == "cpu"
        methods = [m for m in dir(cls) if m.startswith(("time_", "peakmem_", "track_"))]
        assert methods
        for method in methods:
            bench_obj = cls()
            bench_obj.setup(*first)
            result = getattr(bench_obj, method)(*first)
            if method.startswith("track_"):
                assert _positive(result)
                assert getattr(cls, method).unit == "GB/s"
        gpu = list(first)
        gpu[backend_at] = "gpu"
        try:
            cls().setup(*gpu)
        except NotImplementedError:
            pass                        # skipped, as asv would report it


@pytest.mark.parametrize("stream", [False, True], ids=["memcpy", "streaming"])
@pytest.mark.parametrize("n,shift", [(1, 0), (63, 1), (4097, 3), ((3 << 20) + 77, 5)])
def test_parallel_copy_copies_exactly(stream, n, shift):
    """The copy floor of the benchmarks (both kinds) copies every byte, at any
    alignment and length, across the 1 MiB blocks its threads share."""
    from fastbn import _cpu

    src = np.random.default_rng(n).integers(0, 256, n + shift, dtype=np.uint8)[shift:]
    for threads in (1, 2):
        dst = np.zeros(n + 64, np.uint8)[7:7 + n]
        _cpu.parallel_copy(src, dst, threads, stream)
        np.testing.assert_array_equal(dst, src)


@pytest.mark.parametrize("stream", [False, True], ids=["memset", "streaming"])
def test_parallel_read_and_fill(stream):
    """The read and write floors of tools/floors.py touch every byte."""
    from fastbn import _cpu

    a = np.random.default_rng(3).integers(0, 256, (3 << 20) + 77, dtype=np.uint8)
    body = a[:a.size // 64 * 64]          # whole lines: the XOR of every 64-bit word
    assert _cpu.parallel_read(body, 2) == int(np.bitwise_xor.reduce(body.view(np.uint64)))
    assert _cpu.parallel_read(a, 1) == _cpu.parallel_read(a, 2)
    dst = np.full(a.size + 9, 7, np.uint8)
    for threads in (1, 2):
        dst[...] = 7
        _cpu.parallel_fill(dst[5:-4], threads, stream)
        assert (dst[5:-4] == 0x5a).all() and (dst[:5] == 7).all() and (dst[-4:] == 7).all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("op", bench.OPS)
def test_bench_contenders_compute_the_same_thing(op, layout):
    """Each row times one operation: fastbn's call, the reference's and torch's
    (where importable) give the same results, so the speed-ups compare like
    with like (backward-eval: frozen running statistics in all three)."""
    from .conftest import assert_close

    inp = bench.make_inputs((4, 6, 5, 3), np.float32, layout, np.random.default_rng(5))
    got = bench.fastbn_call(op, inp, 1)()
    ref = bench.reference_call(op, inp)()
    if op.startswith("forward"):
        got, ref = [got[0]], [ref.y]
    for g, r, what in zip(got, ref, ("out", "dweight", "dbias")):
        assert_close(g, r, np.float32, f"{op} {what}")
    if bench._torch() is None:
        return
    call = bench.torch_call(op, inp, 1)
    res = call()
    res = [res[0]] if op.startswith("forward") else list(res)
    for t, r, what in zip(res, ref, ("out", "dweight", "dbias")):
        t = t.contiguous().numpy()                  # logical (N, C, ...) order
        if t.ndim == 4 and layout == "nhwc":
            t = t.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(t, r, rtol=1e-4, atol=1e-4, err_msg=f"torch {op} {what}")


@pytest.mark.parametrize("method", ["rotated", "best"])
def test_ab_tool_times_each_build_of_every_op(method, capsys):
    """tools/ab.py (BENCHMARKS.md, "How A/B runs are made") loads each build as a
    module of its own and prints a time per build and the ratios: one line per
    (shape, layout, op, threads)."""
    from fastbn import _cpu

    spec = importlib.util.spec_from_file_location("fastbn_ab_tool", ROOT / "tools" / "ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    so = _cpu.__file__
    assert ab.main([so, so, "--shapes", "4x24x3x3", "--ops", "train,infer,bwd,eval",
                    "--threads", "1,2", "--repeat", "2", "--method", method,
                    "--loop-ms", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 4 * 2                       # layouts x ops x threads
    for line in lines:
        ratio = float(line.rsplit("ratio", 1)[1])
        assert math.isfinite(ratio) and ratio > 0, line
    with pytest.raises(SystemExit):
        ab.main([so, "--ops", "bwd"])                    # one build: nothing to compare
