"""The life of a compaction after the scheduler planned it, in one owner.

A plan (workers/block_manager.CompactionPlan) has already moved the request's page table to its
destination pages; what is left is data movement and freeing. Plans are either run now (CPU, and early
compressions that must land before the forward that reads them) or *deferred*: queued at the end of a
step and launched beside the next step's forward on the compressor's stream, so they overlap it. A
launched plan is *in flight* until its event completes; it then *lands*: the pages it replaced go back to
the pool. From plan to landing the request is `compressing` (not schedulable); this class alone sets and
clears that flag.
"""

from __future__ import annotations

from zipserve.workers.block_manager import BlockManager, CompactionPlan


class CompactionQueue:
    def __init__(self, runner, block_manager: BlockManager, land_in_lockstep: bool = False):
        self.runner = runner  # .compact(plans, overlap, after) -> event or None
        self.bm = block_manager
        self.land_in_lockstep = land_in_lockstep  # tensor parallel: every rank lands at the same step
        self.deferred: list[CompactionPlan] = []
        self.in_flight: list[tuple[object, list[CompactionPlan]]] = []  # (event or None, plans), oldest first
        self.pages_freed = 0  # pages compressions gave back to the pool, net of the fresh pages they took

    def run_now(self, plans: list[CompactionPlan]) -> list[CompactionPlan]:
        """Run these plans in order on the main stream; returns the plans that landed (all of them)."""
        self._launch(plans, overlap=False)
        return self.land()

    def defer(self, plans: list[CompactionPlan]) -> None:
        """Queue plans to launch beside the next step's forward."""
        for plan in plans:
            plan.seq.compressing = True
        self.deferred += plans

    def launch_deferred(self, after=None) -> None:
        """Launch the deferred plans on the compressor's stream, after the main-stream event `after`."""
        plans, self.deferred = self.deferred, []
        self._launch(plans, overlap=True, after=after)

    def land(self) -> list[CompactionPlan]:
        """Free the pages of the compactions whose data has moved; returns their plans (the requests resume)."""
        if self.land_in_lockstep:  # a query() result depends on timing, which differs between ranks
            for event, _ in self.in_flight:
                if event is not None:
                    event.synchronize()
        landed = []
        while self.in_flight and (self.in_flight[0][0] is None or self.in_flight[0][0].query()):
            _, plans = self.in_flight.pop(0)
            for plan in plans:
                self.pages_freed += self.bm.holder_counts(plan.release)[1] - plan.num_fresh
                self.bm.release(plan.release)
                plan.seq.compressing = False
            landed += plans
        return landed

    def wait_oldest(self) -> None:
        """Block until the oldest in-flight compaction has finished (nothing else left to do)."""
        if self.in_flight and self.in_flight[0][0] is not None:
            self.in_flight[0][0].synchronize()

    @property
    def busy(self) -> bool:
        return bool(self.in_flight or self.deferred)

    @property
    def running(self) -> bool:
        """Launched and not landed (deferred plans have not started)."""
        return bool(self.in_flight)

    def pending_release(self) -> list[int]:
        """Pages that queued and in-flight plans still hold a reference to (released when they land)."""
        plans = [p for _, ps in self.in_flight for p in ps] + self.deferred
        return [b for p in plans for b in p.release]

    def _launch(self, plans: list[CompactionPlan], overlap: bool, after=None) -> None:
        if not plans:
            return
        for plan in plans:
            plan.seq.compressing = True
        self.in_flight.append((self.runner.compact(plans, overlap, after), plans))
