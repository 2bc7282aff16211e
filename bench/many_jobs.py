"""Drive N single-disk copies (with pivot) concurrently from ONE process through the Manager API,
as a management app would; bench/run.py measures this process's CPU time and peak RSS.

usage: many_jobs.py STATE_DIR DOMAIN=DEST [DOMAIN=DEST ...]   (domains already attached)
"""

from __future__ import annotations

import asyncio
import sys

from blockcopy import CopyRequest, Manager, Until
from blockcopy.records import Goal, Outcome


async def main(state: str, pairs: list[tuple[str, str]]) -> int:
    manager = Manager(state, create_journal=False)
    try:
        ops = await asyncio.gather(*(
            manager.copy(CopyRequest(domain, [("vda", dest)], bandwidth_mib=8, goal=Goal.PIVOT), until=Until.DONE)
            for domain, dest in pairs))
    finally:
        manager.close()
    return 0 if all(op.outcome is Outcome.PIVOTED for op in ops) else 1


if __name__ == "__main__":
    args = [tuple(a.split("=", 1)) for a in sys.argv[2:]]
    sys.exit(asyncio.run(main(sys.argv[1], args)))  # type: ignore[arg-type]
