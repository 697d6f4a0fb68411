"""``python bench/_cpuprof.py OUT.prof -m module args...``: run a module under cProfile timed by the
thread's CPU clock (not the wall clock, which a busy machine inflates with time spent preempted).
bench/cpu_per_request.py --profile uses it. Not a test."""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: _cpuprof.py OUT.prof -m module [args...]")
    sys.argv = [module, *rest]
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
