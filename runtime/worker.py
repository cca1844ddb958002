"""A rank that the leader spawned (runtime/ranks.py `RankGroup.start`): `python -m ropesp.runtime.worker`.

It joins the leader's group on the loopback store, then follows the leader's commands until SHUTDOWN
(runtime/rank_engine.py `follow`). It exits on its own as soon as the leader's process is gone.
"""

from __future__ import annotations

import argparse
import sys

from ropesp.errors import RopespError


def main(argv: list[str] | None = None) -> int:
    """Entry point of a spawned rank (started by the leader, not by users)."""
    p = argparse.ArgumentParser(prog="python -m ropesp.runtime.worker", description=main.__doc__)
    for name in ("--rank", "--world-size", "--port", "--parent-pid"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--device", required=True)
    args = p.parse_args(argv)
    from ropesp.runtime.ranks import exit_with_parent, ignore_interrupts

    exit_with_parent(args.parent_pid)
    ignore_interrupts()
    import os

    from ropesp.runtime.dist import Mapping, is_collective_timeout, report_stall
    from ropesp.runtime.rank_engine import follow
    from ropesp.runtime.ranks import RankGroup

    group = None
    try:
        group = RankGroup(
            args.world_size,
            args.device,
            mapping=Mapping(args.world_size, args.rank, args.rank),
            port=args.port,
        ).start()
        follow(group)
    except RopespError as exc:
        print(f"ropesp: error (rank {args.rank}): {exc}", file=sys.stderr, flush=True)
        os._exit(2)  # no interpreter teardown: it could wait on peers stuck in a collective
    except Exception as exc:
        if is_collective_timeout(exc):
            line = report_stall(args.rank)
            if line:
                print(f"ropesp: error (rank {args.rank}): {line}", file=sys.stderr, flush=True)
            os._exit(2)
        if "Connection reset" in str(exc) or "Connection closed" in str(exc):
            os._exit(3)  # the leader went away: nothing to report here
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
