"""Where the time from the command to the first step goes: an import hook that every Python process of a run loads
(the driver, Ray's actors, the training workers inherit PYTHONPATH) and that appends one line per phase start/end,
seconds since PROF_T0, to PROF_OUT. Nothing of the product changes. Usage (bench/RESULTS.md, issue 15):

  PROF_T0=$(date +%s.%N) PROF_OUT=/tmp/events.txt PYTHONPATH=bench/startup_profile \\
    python -m orchestrator +experiment=legal_demo logger.mode=disabled trainer.max_steps=1 hydra.run.dir=/tmp/p1
  sort -n /tmp/events.txt
"""

import functools
import importlib.abc
import importlib.util
import os
import sys
import time

T0 = float(os.environ.get("PROF_T0", "0"))
OUT = os.environ.get("PROF_OUT", "/tmp/startup_events.txt")


def mark(what):
    with open(OUT, "a") as handle:
        handle.write(f"{time.time() - T0:8.2f} pid={os.getpid()} {what}\n")


mark("python started " + " ".join(sys.argv[:2])[-60:])


def wrap(obj, name, label):
    fn = getattr(obj, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        mark(f"{label} start")
        try:
            return fn(*args, **kwargs)
        finally:
            mark(f"{label} end")

    setattr(obj, name, timed)


PATCH = {  # module -> what to time once it is imported (its import is timed too)
    "orchestrator.train_loop": lambda m: [wrap(m.Recipe, n, n) for n in ("setup_worker", "build_data", "build_engine",
                                                                         "restore", "train_step", "validate")],
    "orchestrator.model": lambda m: [wrap(m, "build_model", "build_model"), wrap(m, "load_tokenizer", "load_tokenizer")],
    "orchestrator.data": lambda m: [wrap(m, "encode_data", "encode_data"), wrap(m, "read_data", "read_data")],
    "deepspeed": lambda m: [wrap(m, "initialize", "deepspeed.initialize")],
    "orchestrator.preflight": lambda m: wrap(m, "preflight", "preflight"),
    "launch.local": lambda m: [wrap(m, "start_ray", "start_ray"), wrap(m, "run_training", "run_training")],
}


class Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCH:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            mark(f"import {name} start")
            execute(module)
            mark(f"import {name} end")
            PATCH[name](module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, Finder())
