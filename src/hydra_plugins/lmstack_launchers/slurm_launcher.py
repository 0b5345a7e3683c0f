"""`hydra/launcher=slurm`: hydra-submitit-launcher's Slurm launcher, where a job that dies
(killed, out of memory, cancelled) is a failed point and the sweep goes on (lmstack/launchers.py).

Hydra imports every module under hydra_plugins on each run, so this one stays light: submitit
and lmstack's helpers are imported when a sweep is launched.

submitit (the slurm extra, not always installed) and lmstack.launchers, which imports it,
are imported where used: Hydra imports every launcher plugin at start-up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from omegaconf import OmegaConf

try:  # the `slurm` extra
    from hydra_plugins.hydra_submitit_launcher import submitit_launcher
except ImportError:
    submitit_launcher = None

if submitit_launcher is not None:

    class SlurmLauncher(submitit_launcher.SlurmLauncher):
        def launch(
            self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
        ) -> Sequence[JobReturn]:
            from submitit.core.utils import FailedJobError

            from lmstack.launchers import (
                SqueueWatcher,
                check_slurm_commands,
                failed_point,
                sacct_answers,
                stop_for_bad_input,
            )

            check_slurm_commands()
            try:
                jobs = self._submit(job_overrides, initial_job_idx)
            except FailedJobError as error:  # sbatch said no: its own words name the cause
                stop_for_bad_input(f"sbatch refused the sweep's jobs: {error}")
            # how often, at most, job states are asked for (submitit's default with sacct)
            watcher = SqueueWatcher(delay_s=600 if sacct_answers() else 10)
            returns = []
            for job, overrides in zip(jobs, job_overrides):
                job.watcher = watcher
                try:
                    returns.append(job.results()[0])
                except Exception as error:  # the job ended without a result
                    returns.append(failed_point(job, self._run_dir(overrides), overrides, error))
            return returns

        def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
            """The plugin's own launch (hydra-submitit-launcher 1.2) up to the submission."""
            import submitit

            assert self.config is not None and len(job_overrides) > 0
            params = self.params
            init_keys = {"max_num_timeout", "submitit_folder"}
            executor = submitit.AutoExecutor(
                cluster=self._EXECUTOR,
                folder=params["submitit_folder"],
                **{f"{self._EXECUTOR}_max_num_timeout": params["max_num_timeout"]},
            )
            base_params = set(OmegaConf.structured(submitit_launcher.BaseQueueConf).keys())
            executor.update_parameters(
                **{
                    k if k in base_params else f"{self._EXECUTOR}_{k}": v
                    for k, v in params.items()
                    if k not in init_keys
                }
            )
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            submitit_launcher.log.info(
                f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}"
            )
            sweep_dir.mkdir(parents=True, exist_ok=True)
            if "mode" in self.config.hydra.sweep:
                os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
            job_params = []
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                submitit_launcher.log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
                state = Singleton.get_state()
                job_params.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_{idx}", state))
            return executor.map_array(self, *zip(*job_params))

        def _run_dir(self, overrides: Sequence[str]) -> Path:
            assert self.hydra_context is not None and self.config is not None
            point = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            return Path(str(point.hydra.sweep.dir)) / str(point.hydra.sweep.subdir)
