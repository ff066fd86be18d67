"""bench/capture_perf.py's pure parts: perf report lines to samples per symbol, oneDNN's JIT
kernels matched across the two servers, symbols put in the groups the breakdown prints."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from capture_perf import group_of, parse_report  # noqa: E402

REPORT = """\
# Samples: 9K of event 'cpu-clock:ppp'
#
    15.18%          3081  libpython3.11.so.1.0                          [.] _PyEval_EvalFrameDefault
     8.77%          1779  [JIT] tid 1191                                [.] jit_brgemm_kernel_t.114
     4.49%           912  [JIT] tid 1191                                [.] jit_brgemm_kernel_t.115
     1.27%           260  libc.so.6                                     [.] _int_malloc
     0.64%           130  co7ec7jo2imlgyzpsxwmvlb6kxqnhkpi3dbsbsnv5fxqgrojjfoi.main.so  [.] kernel._omp_fn.1
     0.45%            92  [kernel.kallsyms]                             [k] irqentry_exit_to_user_mode
     0.20%            40  libtorch_cpu.so                               [.] c10::function_ref<void (char**, long const*, long, long)>::callback_fn<at::native::AVX2::VectorizedLoop2d<...> >
     0.10%            20  _C.abi3.so                                    [.] cpu_attention::AttentionMainLoop<cpu_attention::AttentionImpl<(cpu_attention::ISA)1, float, 64l, float> >::operator()
"""


def test_report_lines_become_samples_per_symbol_with_jit_kernels_named_alike_in_every_process():
    counts = parse_report(REPORT)
    assert counts[("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault")] == 3081
    # two JIT kernels of one GEMM family, their process and serial number dropped: one key
    assert counts[("[JIT]", "jit_brgemm_kernel_t")] == 1779 + 912
    assert counts[("[kernel.kallsyms]", "irqentry_exit_to_user_mode")] == 92
    assert sum(counts.values()) == 3081 + 1779 + 912 + 260 + 130 + 92 + 40 + 20  # header lines skipped
    other = parse_report(REPORT.replace("tid 1191", "tid 3209").replace(".114", ".100"))
    assert other[("[JIT]", "jit_brgemm_kernel_t")] == 1779 + 912


def test_symbols_fall_in_the_groups_the_breakdown_prints():
    groups = {k: group_of(*k) for k in parse_report(REPORT)}
    assert groups[("[JIT]", "jit_brgemm_kernel_t")].startswith("oneDNN")
    assert groups[("co7ec7jo2imlgyzpsxwmvlb6kxqnhkpi3dbsbsnv5fxqgrojjfoi.main.so", "kernel._omp_fn.1")].startswith("inductor")
    assert groups[("[kernel.kallsyms]", "irqentry_exit_to_user_mode")].startswith("libc")  # page faults: not inductor's
    assert groups[("libc.so.6", "_int_malloc")].startswith("libc")
    assert groups[("libpython3.11.so.1.0", "_PyEval_EvalFrameDefault")] == "Python interpreter"
    assert groups[("_C.abi3.so", next(s for d, s in groups if d == "_C.abi3.so"))].startswith("vLLM")
    assert [g for k, g in groups.items() if k[0] == "libtorch_cpu.so"] == ["libtorch (dispatch, eager kernels)"]
