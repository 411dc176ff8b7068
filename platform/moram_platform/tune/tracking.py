"""MLflow layout of a sweep: a parent run per sweep, a child run per trial (training trials are
in turn the parents of their sequence runs). Runs are found again by tags, so a resumed sweep
continues its own runs instead of creating new ones."""
from __future__ import annotations

from typing import Any

from ..tracking import KIND_TAG, RUN_ID_TAG, Tracker

SWEEP_TAG, STAGE_TAG, TRIAL_TAG, DIGEST_TAG = "moram.sweep", "moram.stage", "moram.trial_id", "moram.space_digest"


class SweepTracker(Tracker):
    """The MLflow side of one sweep (``name``)."""

    def __init__(self, tracking_uri: str, experiment: str, name: str):
        super().__init__(tracking_uri, experiment, run_id=name)
        self.name = name

    def sweep_run(self, params: dict[str, Any], tags: dict[str, str], digest: str,
                  kind: str = "sweep") -> tuple[str, bool]:
        """(MLflow run id of the sweep's parent run, whether it already existed); ``kind`` "study"
        for a study's parent (tune/study.py).

        A sweep resumed with a different space is refused: its trials would not be comparable."""
        found = self._find_run(f"tags.`{SWEEP_TAG}` = '{self.name}' and tags.`{KIND_TAG}` = '{kind}'")
        if found is not None:
            recorded = found.data.tags.get(DIGEST_TAG)
            if recorded != digest:
                raise ValueError(f"{kind} {self.name} was started with a different space file or base config "
                                 f"(digest {recorded}, now {digest}); resume it unchanged or use a new --name")
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id, True
        run = self.client.create_run(self.experiment_id, run_name=self.name, tags={
            SWEEP_TAG: self.name, KIND_TAG: kind, DIGEST_TAG: digest, **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id, False

    def trial_run(self, sweep_run_id: str, stage: str, trial_id: str, params: dict[str, Any],
                  tags: dict[str, str] | None = None) -> str:
        """The MLflow run of one trial, a child of the sweep run (the same run when a trial restarts)."""
        found = self._find_run(f"tags.`{SWEEP_TAG}` = '{self.name}' and tags.`{KIND_TAG}` = 'trial' "
                               f"and tags.`{TRIAL_TAG}` = '{trial_id}'")
        if found is not None:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"{stage}-{trial_id}", tags={
            SWEEP_TAG: self.name, KIND_TAG: "trial", STAGE_TAG: stage, TRIAL_TAG: trial_id,
            "mlflow.parentRunId": sweep_run_id, **(tags or {})})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def close_trial(self, trial_id: str, status: str, sequence_run_id: str | None = None) -> None:
        """Mark a trial's run (and its sequence run) ended; a trial stopped early by the scheduler
        was killed mid-sequence and could not do it itself."""
        query = f"tags.`{SWEEP_TAG}` = '{self.name}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
        runs = [r for r in [self._find_run(query)] if r is not None]
        if sequence_run_id:
            runs += self.client.search_runs([self.experiment_id], filter_string=(
                f"tags.`{RUN_ID_TAG}` = '{sequence_run_id}'"), max_results=1000)
        for run in runs:
            if run.info.status in ("RUNNING", "SCHEDULED"):
                self.finish(run.info.run_id, status=status)

    def _find_run(self, query: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1,
                                       order_by=["attributes.start_time ASC"])
        return runs[0] if runs else None
