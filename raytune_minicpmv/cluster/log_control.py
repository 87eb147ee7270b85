"""How much a run prints: our progress at the chosen level, Ray's and the libraries' own chatter only on request.

    raytune-minicpmv --log-level INFO  ...   # default: our INFO lines, warnings and errors of everything
    raytune-minicpmv --log-level DEBUG ...   # everything, as Ray prints it (Ray Data plans, Tune result tables, ...)
    raytune-minicpmv --log-level WARNING ... # only warnings and errors

`configure(level)` runs in the command's process; it exports RAYTUNE_MINICPMV_LOG_LEVEL, which `cluster.init_ray`
passes to every Ray worker together with `worker_process_setup_hook=WORKER_HOOK`, so the same rules apply in Tune
trial drivers, Train workers and Ray Data actors on every node (their output reaches the driver via log_to_driver).

Quiet means (any level above DEBUG): Ray Data's, Ray Train's and Ray Tune's INFO chatter off (their warnings stay,
except the State API warning that Train's placement-group cleaner repeats about once a second when the dashboard is
off: `cluster.init_ray` says that once instead); transformers at `error` (its empty model-type warnings); Python's
FutureWarning/DeprecationWarning off (transformers/Ray deprecations repeated by every worker); Tune's own
tables off, one line per trial start/end instead (`tune_verbosity`, `want_trial_lines`).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

LEVEL_ENV = "RAYTUNE_MINICPMV_LOG_LEVEL"
WORKER_HOOK = "raytune_minicpmv.cluster.log_control.setup_worker"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Ray Data (re)configures its 'ray.data' logger from this file in every process (RAY_DATA_LOGGING_CONFIG), so a level
# set on the logger alone does not last. It is Ray's default config with the console handler at WARNING (the
# ray-data.log file in the session dir keeps everything); a path next to this module is valid on every node.
RAY_DATA_QUIET_CONFIG = Path(__file__).with_name("ray_data_logging_quiet.yaml")

# Ray loggers whose INFO lines are Ray's internals (plans, resource requests, process-group setup)
RAY_CHATTY_LOGGERS = ("ray.train", "ray.tune", "ray.air")  # ray.data: RAY_DATA_QUIET_CONFIG
# repeats once per second without the dashboard (the driver says it once instead: cluster.init_ray); the one-off
# notice that a local Ray turned token authentication on
RAY_REPEATING_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
                         "ray._private.authentication.authentication_token_setup")


def current_level() -> str:
    level = os.environ.get(LEVEL_ENV, "INFO").upper()
    return level if level in LEVELS else "INFO"


def is_quiet() -> bool:
    return current_level() != "DEBUG"


def configure(level: str) -> None:
    """Set up the command's process and export the level to the Ray workers it starts."""
    level = level.upper()
    os.environ[LEVEL_ENV] = level
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    logging.getLogger().setLevel(logging.WARNING)  # other libraries: warnings and errors
    logging.getLogger("raytune_minicpmv").setLevel(level)
    _apply(level)


def setup_worker() -> None:
    """Ray's worker_process_setup_hook: the same rules in every Ray worker process of the run."""
    _apply(current_level())


def tune_verbosity() -> int:
    """Tune's `RunConfig(verbose=...)`: its status and per-trial result tables (3) at DEBUG, else silent (0)."""
    return 3 if current_level() == "DEBUG" else 0


def want_trial_lines() -> bool:
    """At INFO, one line per trial start and end (tune_report.trial_progress_callback) stands in for Tune's tables."""
    return current_level() == "INFO"


def ray_train_log_level() -> str:
    """Ray Train's `LoggingConfig(log_level=...)`: it filters only ray.train records on the console of its controller
    and workers (which configure their own loggers, so a level set by the hook would not last)."""
    return "DEBUG" if current_level() == "DEBUG" else "WARNING"


def worker_env() -> dict[str, str]:
    """Environment for Ray workers (set in the runtime env; the hook reads it)."""
    env = {LEVEL_ENV: current_level()}
    if is_quiet():
        env["TRANSFORMERS_VERBOSITY"] = "error"
    return env


def _apply(level: str) -> None:
    if level == "DEBUG":
        # an environment inherited from a quiet run (a parent command, an earlier call in this process) must not
        # keep Ray Data quiet here
        if os.environ.get("RAY_DATA_LOGGING_CONFIG") == str(RAY_DATA_QUIET_CONFIG):
            del os.environ["RAY_DATA_LOGGING_CONFIG"]
        return
    # read by transformers / huggingface_hub / Ray Data when they are imported (after this, in workers: the hook
    # runs before any task); set here rather than imported, so a bare Ray worker does not pay for the imports
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(RAY_DATA_QUIET_CONFIG)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    floor = max(logging.WARNING, getattr(logging, level))
    for name in RAY_CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(floor)
    for name in RAY_REPEATING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # already imported: its verbosity was read at import
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    if "ray.data" in sys.modules:  # already configured from the default: reconfigure from our file
        from ray.data._internal.logging import configure_logging

        configure_logging()


class DropRayDataNotices(logging.Filter):
    """Console filter of RAY_DATA_QUIET_CONFIG: Ray Data's notice that progress bars are off (a warning printed by
    every split coordinator; we turn them off on purpose for preprocessed re-reads)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars disabled")
