"""The crash points of each command: every journaled step and every QMP command, in protocol order.

``NAME@N`` is the N-th time a point is reached. While a crash point is armed, the commands of one
batch go to QEMU one at a time (see ``faults.serial``), so ``qmp:job-finalize@1`` of a two-disk
pivot falls between the two finalizes: one device switched, the other job still pending. Produced
by ``BLOCKCOPY_TRACE_POINTS`` and checked by
``test_crash_matrix.py::test_the_table_matches_a_traced_run`` (a traced run reaches exactly these,
in this order).
Read with the phase table at the top of ``src/blockcopy/protocol.py``.
"""

from __future__ import annotations

# Per disk: the identity of the image made for DEST is journaled (starting@2) before it is linked
# into place (create-image), the stage is journaled (starting@3), DEST is passed to QEMU as a file
# descriptor and added (add-dest), and the mirror started.
_START_1 = ["journal:starting@1", "journal:starting@2", "create-image@1", "journal:starting@3", "add-dest@1",
            "qmp:blockdev-mirror@1", "journal:starting@4"]
_START_2 = [*_START_1, "journal:starting@5", "create-image@2", "journal:starting@6", "add-dest@2",
            "qmp:blockdev-mirror@2", "journal:starting@7"]

POINTS: dict[tuple[str, int], list[str]] = {
    ("pivot", 1): [*_START_1, "journal:copying@1", "journal:pivoting@1", "sync-images@1", "run-state@1",
                   "qmp:stop@1",
                   "qmp:job-complete@1", "journal:finalizing@1", "qmp:job-finalize@1", "journal:settling@1",
                   "qmp:cont@1", "journal:settling@2", "qmp:job-dismiss@1", "qmp:blockdev-del@1",
                   "qmp:blockdev-del@2", "journal:done@1"],
    ("pivot", 2): [*_START_2, "journal:copying@1", "journal:pivoting@1", "sync-images@1", "run-state@1",
                   "qmp:stop@1",
                   "qmp:job-complete@1", "qmp:job-complete@2", "journal:finalizing@1", "qmp:job-finalize@1",
                   "qmp:job-finalize@2", "journal:settling@1", "qmp:cont@1", "journal:settling@2",
                   "qmp:job-dismiss@1", "qmp:blockdev-del@1", "qmp:job-dismiss@2", "qmp:blockdev-del@2",
                   "qmp:blockdev-del@3", "qmp:blockdev-del@4", "journal:done@1"],
    # finishing@2: every mirror seen ending cleanly; then DEST closed and fsynced, one record per disk.
    ("finish", 1): [*_START_1, "journal:copying@1", "journal:finishing@1", "qmp:block-job-cancel@1",
                    "qmp:job-finalize@1", "journal:finishing@2", "qmp:job-dismiss@1", "qmp:blockdev-del@1",
                    "sync-dest@1", "journal:finishing@3", "journal:settling@1", "qmp:remove-fd@1",
                    "journal:settling@2", "journal:done@1"],
    ("finish", 2): [*_START_2, "journal:copying@1", "journal:finishing@1", "qmp:block-job-cancel@1",
                    "qmp:block-job-cancel@2", "qmp:job-finalize@1", "qmp:job-finalize@2", "journal:finishing@2",
                    "qmp:job-dismiss@1", "qmp:blockdev-del@1", "qmp:job-dismiss@2", "qmp:blockdev-del@2",
                    "sync-dest@1", "journal:finishing@3", "sync-dest@2", "journal:finishing@4",
                    "journal:settling@1", "qmp:remove-fd@1", "qmp:remove-fd@2", "journal:settling@2",
                    "journal:done@1"],
    ("abort", 1): ["journal:copying@1", "journal:aborting@1", "qmp:job-cancel@1", "journal:settling@1",
                   "qmp:job-dismiss@1", "qmp:blockdev-del@1", "qmp:remove-fd@1", "journal:settling@2",
                   "journal:done@1"],
    ("abort", 2): ["journal:copying@1", "journal:aborting@1", "qmp:job-cancel@1", "qmp:job-cancel@2",
                   "journal:settling@1", "qmp:job-dismiss@1", "qmp:blockdev-del@1", "qmp:job-dismiss@2",
                   "qmp:blockdev-del@2", "qmp:remove-fd@1", "qmp:remove-fd@2", "journal:settling@2",
                   "journal:done@1"],
}

#: From this point on the outcome is journaled (the first ``journal:settling``) and stands even if
#: QEMU dies afterwards; before it, a dead QEMU means the source (or both, when proven identical).
OUTCOME_POINT = "journal:settling@1"
#: From this point on a finish has closed and fsynced DEST: its consistency is claimed.
CONSISTENT_POINT = "journal:finishing@3"


def outcome_journaled(command: str, disks: int, point: str) -> bool:
    points = POINTS[(command, disks)]
    return points.index(point) >= points.index(OUTCOME_POINT)
