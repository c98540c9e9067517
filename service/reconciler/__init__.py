"""The reconciler: the one loop that moves jobs between the database and Ray.

Each pass:
1. follows launching/running jobs: Ray status -> our status, result.json for the outcome,
   infrastructure failures retried with backoff (a new attempt resumes from the run's
   checkpoints, since the run name is the job id) - a job Ray no longer knows (the cluster was
   replaced) is one of them - and failed with the reason once the attempts are spent;
2. launches queued jobs that fit the cluster, in submission order;
3. makes sure cancelled jobs are stopped on Ray.

One job's trouble never stalls the others: each job is handled apart, a launch that fails
deterministically (its storage cannot be written) fails that job with the reason, and a transient
one is retried on later passes up to the attempt limit. Passes that keep failing show in `/readyz`
and `/metrics` (`consecutive_failures`, `failed_passes`, `job_errors`); `/readyz` also shows
the error of the latest pass while it fails.

When the embedded Ray head was replaced (it died and was restarted, or the server found its
recorded head gone), `cluster_replaced` moves every launching or running job to a new attempt
before anything is launched on the new head, so no attempt is ever submitted to two heads.

Never launching twice rests on two facts: a job moves queued -> launching (a compare-and-set,
with the attempt's submission id) BEFORE anything is submitted, and submission ids are
deterministic (`<job id>-<attempt>`). So after a crash, a `launching` job is looked up on Ray by
its submission id and adopted if it exists, submitted if it does not; Ray refuses a second
submission with the same id.

The parts, by role:
- `loop`: `Reconciler`, its thread, its health and its passes; stopping cancelled jobs;
- `following`: launching and running jobs follow their Ray jobs; the outcome of an ended one;
- `launching`: which queued jobs fit the cluster, and the steps of one launch.
"""

from service.reconciler.loop import FAILING_PASSES, Reconciler

__all__ = ["FAILING_PASSES", "Reconciler"]
