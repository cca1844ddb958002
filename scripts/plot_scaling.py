"""FPS (DiT only) against GPU count, one line per `ropesp bench` configuration.

    python scripts/plot_scaling.py OUT.png bench_p1.json bench_p2.json bench_p4.json

Reads the JSON files `ropesp bench --json` writes (any world sizes, one machine), prints the table and
writes the plot; the ideal line scales the best one-GPU result linearly. Runs of `ropesp bench --alone`
(one rank's compute at world size P, its collectives moving nothing) make their own "compute only"
lines, starting from the same configuration's one-GPU result: the ceiling beside the real scaling.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

ALONE = " (compute only, --alone)"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    out, files = Path(argv[0]), [Path(a) for a in argv[1:]]
    fps: dict[str, dict[int, float]] = defaultdict(dict)
    cards = set()
    for f in files:
        data = json.loads(f.read_text())
        cards.add(data["environment"]["card"])
        alone = data["setup"].get("alone", False)
        for name, row in data["results"].items():
            fps[name + ALONE if alone else name][row["world_size"]] = row["fps_dit"]
    for name in [n for n in fps if n.endswith(ALONE)]:
        base = fps.get(name.removesuffix(ALONE), {})
        if 1 in base:
            fps[name].setdefault(1, base[1])
    gpus = sorted({p for series in fps.values() for p in series})
    width = max(len(name) for name in fps) + 2
    print(f"{'config':<{width}}" + "".join(f"{f'P={p}':>9}" for p in gpus))
    for name, series in fps.items():
        print(
            f"{name:<{width}}" + "".join(f"{series[p]:>9.1f}" if p in series else f"{'-':>9}" for p in gpus)
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, series in fps.items():
        ps = sorted(series)
        ax.plot(ps, [series[p] for p in ps], marker="o", label=name)
    best1 = max((s[1] for s in fps.values() if 1 in s), default=None)
    if best1:
        ax.plot(gpus, [best1 * p for p in gpus], "k:", label="ideal (best 1-GPU x P)")
    ax.set_xlabel("GPUs")
    ax.set_ylabel("FPS (DiT only)")
    ax.set_xticks(gpus)
    ax.set_title(", ".join(sorted(cards)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
