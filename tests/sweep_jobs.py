"""A stand-in for experiments.sweep.RunJob in the sweep tests: quick, standard library only.

Submitted through submitit's real local executor, it runs in a job process like RunJob, with
the same arguments (config, overrides, workdir, multihost), and writes what a finished
experiments.main run writes (experiment.json, results.json), or fails as told. Every call
appends a line to <root>/calls.jsonl (the sweep root is the work directory's parent).
"""

from __future__ import annotations

import json
import os
import signal
import time


class FakeJob:
  """Behaviour per run name: fail (raise) on the first attempt, die (SIGKILL itself), finish
  without results, or hold until <workdir>/release exists."""

  def __init__(self, experiments=None, fail_once=(), die_once=(), no_results=(), hold=(),
               seconds=0.0):
    self.experiments = dict(experiments or {})
    self.fail_once, self.die_once = set(fail_once), set(die_once)
    self.no_results, self.hold = set(no_results), set(hold)
    self.seconds = seconds

  def __call__(self, config, overrides, workdir, multihost):
    name = os.path.basename(workdir)
    started = time.time()
    print(f"fake training {name}", flush=True)
    if name in self.experiments:
      with open(os.path.join(workdir, "experiment.json"), "w") as handle:
        json.dump(self.experiments[name], handle)
    marker = os.path.join(workdir, "attempted")
    first = not os.path.exists(marker)
    open(marker, "a").close()
    if name in self.hold:
      deadline = time.time() + 120
      while not os.path.exists(os.path.join(workdir, "release")) and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(self.seconds)
    with open(os.path.join(os.path.dirname(workdir), "calls.jsonl"), "a") as handle:
      handle.write(json.dumps({"name": name, "config": config, "overrides": list(overrides),
                               "multihost": multihost, "pid": os.getpid(),
                               "started": started, "ended": time.time()}) + "\n")
    if first and name in self.fail_once:
      raise RuntimeError(f"boom in {name}")
    if first and name in self.die_once:
      os.kill(os.getpid(), signal.SIGKILL)
    if name in self.no_results:
      return "no results"
    seed = json.loads(dict(a.split("=", 1) for a in overrides).get("train.seed", "0"))
    results = [{"exit": e, "si_snri_db": 2.0 * e + seed, "params": 1000 * e,
                "gmac_per_s": 0.25 * e} for e in (1, 2)]
    with open(os.path.join(workdir, "results.json"), "w") as handle:
      json.dump(results, handle)
    return "ok"
