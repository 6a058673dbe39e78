"""Stream affinity to a replica inside a pipeline pool: Weir's Serve request router for Pipeline deployments.

A pool is one Pipeline deployment with several replicas (one GPU class). Every call for a stream (open,
push, control, events, close, stream_stats: the stream id is their first argument) must reach the replica
that holds the stream's state. `StreamAffinityRouter` routes by an explicit table
(`scheduling.affinity.AffinityTable`), never by a hash that moves keys when replicas come and go:

    open(stream_id, req, opened_us, replica=R)   to R, the replica the Weir router's admission chose; the
                                                 table learns stream -> R before the call is sent. R not
                                                 advertised yet (just started): wait up to OPEN_WAIT_S for
                                                 it; R retained or gone: an advertised replica gets the
                                                 call and refuses it as addressed to another (retryable)
    open without a replica                       the advertised replica with the most free slots
    any other stream call                        the owner: learned, else listed in the replicas' routing
                                                 stats (a stream another ingress replica opened); unknown:
                                                 any replica, which answers StreamNotFoundError
    warm_shape(h, w, vae, replica=R)             to R (the replica the Weir router asked to warm a shape
                                                 up); R not advertised: any, which declines it
    calls without a stream (load, note_refused)  advertised replicas, most free slots first

Scale-down never cuts a stream. What Ray Serve 2.60 does, read in its source:
  * Serve, not the autoscaling policy, picks the replicas a downscale stops
    (`DeploymentScheduler._get_replicas_to_stop`: not-yet-running first, then by node — head node last,
    fewest replicas first — newest first; load is never looked at), so the policy cannot exempt a busy one.
  * A stopping replica leaves the set advertised to routers at once
    (`DeploymentState.get_running_replica_infos`: RUNNING and PENDING_MIGRATION only) but keeps accepting
    handle requests until its ongoing requests are done (`Replica._drain_ongoing_requests`; it refuses new
    ones only when it quiesces after the drain), for at most `graceful_shutdown_timeout_s`.
  * Every live stream is an ongoing request on its replica: the ingress's `events` call lasts the stream.
So this router retains a replica Serve stopped advertising while a stream it learned still lives there
(`update_replicas`), keeps sending that stream's calls to it, and never places a new stream on it: the
stream finishes on its replica, then the replica's drain ends and it exits. The pool's options set
`graceful_shutdown_timeout_s` to deployments.autoscaling.MAX_STREAM_S: a stream that outlives it on a
stopping replica is cut. (So is, in principle, a stream whose open returned just as its replica was
stopped and whose events call came more than graceful_shutdown_wait_loop_s (0.5 s) later: the ingress
makes that call at once.) The policy (deployments.autoscaling) still only scales down
when a replica is idle, so the drained replica is usually an idle one.

Each ingress process holds its own router (one per handle); it learns the streams it opens itself, which
are exactly those whose calls it makes. Calls are fulfilled one by one for the request that chose the
replica (`_fulfill_next_pending_request`): Serve's base router matches by internal request id, which the
calls of one parent request (all the pipeline calls of one ingress stream) share, and FIFOMixin would
hand a replica chosen for one stream to the oldest request, whatever its stream.

Enable it with `request_router_config()` (the Pipeline deployment's default); replicas publish
`{"streams": [...], "free_slots": n}` from `record_routing_stats`.
"""

from __future__ import annotations

import logging
import time

from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from scheduling.affinity import AffinityTable

log = logging.getLogger("weir.affinity")

ROUTER_CLASS = "deployments.affinity:StreamAffinityRouter"
STREAM_METHODS = frozenset({"open", "push", "control", "events", "close", "stream_stats"})
"""Pipeline methods whose first argument is the stream id."""
END_METHODS = frozenset({"events", "close"})
"""Stream calls whose completion means the stream ended (as this caller sees it)."""
ROUTING_STATS_PERIOD_S = 1.0
"""How often Serve pulls each replica's routing stats (its stream list and free slots)."""
OPEN_WAIT_S = 3.0
"""How long an open waits for its named replica to be advertised to this router (a replica that just
started reaches the Weir router, which admits onto it, before every handle has heard of it)."""


def request_router_config() -> RequestRouterConfig:
    """The Pipeline deployments' `request_router_config`."""
    return RequestRouterConfig(request_router_class=ROUTER_CLASS,
                               request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)


class StreamAffinityRouter(RequestRouter):
    """Serve RequestRouter over an AffinityTable (module docstring). Runs on the handle's router loop."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._table = AffinityTable(time.monotonic)
        self._advertised: set[ReplicaID] = set()

    def initialize_state(self, **kwargs) -> None:
        if kwargs:
            raise ValueError(f"StreamAffinityRouter takes no request_router_kwargs, got {sorted(kwargs)}")

    # -- the replica set ----------------------------------------------------------------------------------

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Serve's advertised replicas, plus the retained ones that still hold a stream of the table."""
        advertised = {r.replica_id for r in replicas}
        self._advertised = advertised
        self._table.update_listings({r.replica_id.unique_id: _listed_streams(r) for r in replicas})
        keep_ids = self._table.retained({rid.unique_id for rid in advertised})
        kept = [r for rid, r in self._replicas.items() if rid not in advertised and rid.unique_id in keep_ids]
        if kept:
            log.info("keeping %d stopped replica(s) of %s routable for their live streams",
                     len(kept), self._deployment_id)
        super().update_replicas([*replicas, *kept])

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._table.drop_replica(replica_id.unique_id)

    # -- routing --------------------------------------------------------------------------------------------

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if pending_request is None or not candidate_replicas:
            return [candidate_replicas] if candidate_replicas else []
        pending_request.routing_context.should_backoff = True  # retries sleep instead of spinning
        advertised = [r for r in candidate_replicas if r.replica_id in self._advertised]
        method = pending_request.metadata.call_method
        named = str(pending_request.kwargs.get("replica") or "")
        if method not in STREAM_METHODS and named:  # warm_shape: to the replica admission chose
            chosen = [r for r in advertised if r.replica_id.unique_id == named]
            return [chosen or advertised or candidate_replicas]  # not there: another one declines it
        if method not in STREAM_METHODS or not pending_request.args:
            return [[r] for r in sorted(advertised, key=_by_free_slots)] or [candidate_replicas]
        stream_id = str(pending_request.args[0])
        if method == "open":
            return self._route_open(stream_id, pending_request, advertised)
        owner = self._table.owner(stream_id)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if owner in by_id:
            return [[by_id[owner]]]
        return [advertised or candidate_replicas]  # nobody holds it: any replica says StreamNotFoundError

    def _route_open(self, stream_id: str, pending_request: PendingRequest,
                    advertised: list[RunningReplica]) -> list[list[RunningReplica]]:
        named = str(pending_request.kwargs.get("replica") or "")
        by_id = {r.replica_id.unique_id: r for r in advertised}
        if not named:
            named = self._table.place({rid: _free_slots(r) for rid, r in by_id.items()}) or ""
        if named in by_id:
            self._table.learn(stream_id, named)
            return [[by_id[named]]]
        retained = {rid.unique_id for rid in self._replicas if rid not in self._advertised}
        if named not in retained and time.time() - pending_request.created_at < OPEN_WAIT_S:
            return []  # not advertised to this router yet: back off and look again
        return [advertised] if advertised else []  # the replica refuses an open addressed to another

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        """Forget a stream when the call that ends it (its events stream, or close) completes."""
        if pending_request.metadata.call_method not in END_METHODS or not pending_request.args:
            return
        stream_id = str(pending_request.args[0])
        loop = self._event_loop
        result.add_done_callback(lambda _: loop.call_soon_threadsafe(self._stream_ended, stream_id))

    def _stream_ended(self, stream_id: str) -> None:
        replica = self._table.forget(stream_id)
        if replica is None or self._table.holds_streams(replica):
            return
        for rid in [rid for rid in self._replicas if rid.unique_id == replica and rid not in self._advertised]:
            log.info("stopped replica %s of %s has no live stream left", rid.unique_id, self._deployment_id)
            super().on_replica_actor_died(rid)  # not routable any more (its drain can end)

    def _fulfill_next_pending_request(self, replica: RunningReplica, request_metadata=None) -> None:
        """Give the replica to the very request it was chosen for (module docstring)."""
        for pr in self._pending_requests_to_fulfill:
            if pr.metadata is request_metadata and not pr.future.done():
                self._cancel_routing_task_for_pending_request(pr)
                self._record_queue_wait_time(pr)
                pr.future.set_result(replica)
                self._remove_pending_request_from_indices(pr)
                return


def _listed_streams(replica: RunningReplica) -> list[str]:
    return list((replica.routing_stats or {}).get("streams", ()))


def _free_slots(replica: RunningReplica) -> int:
    return int((replica.routing_stats or {}).get("free_slots", 0))


def _by_free_slots(replica: RunningReplica) -> tuple[int, str]:
    return -_free_slots(replica), replica.replica_id.unique_id
