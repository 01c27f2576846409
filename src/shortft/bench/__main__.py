"""Worker entry point: `python -m shortft.bench WORKER spec.json out.json` (see shortft.bench.run_worker)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from shortft import files
    from shortft.bench import compare, efficiency, fake, overhead

    workers = {"efficiency_method": efficiency.worker_method, "efficiency_ratio": efficiency.worker_ratio,
               "efficiency_gradlen": efficiency.worker_gradlen, "overhead_side": overhead.worker_side,
               "overhead_paired": overhead.worker_paired, "efficiency_estimate": fake.worker_estimate,
               "compare_group": compare.worker_group}
    if len(argv) != 3 or argv[0] not in workers:
        print(f"usage: python -m shortft.bench {{{','.join(workers)}}} spec.json out.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[1]).read_text())
    files.write_json(argv[2], workers[argv[0]](spec), indent=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
