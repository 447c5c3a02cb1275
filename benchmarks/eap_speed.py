"""EAP fast path vs the reference-shaped faithful path (and ESD-x), measured side by side in one run.

    python benchmarks/eap_speed.py [--images-per-class 20] [--iterations N] [--no-sd14] [--sd14-steps 3]

The same as `erasekit bench eap`. The last line is one JSON object with the ratios (issue 7's keys).
"""

from __future__ import annotations

import sys

from erasekit.bench import app

if __name__ == "__main__":
    app(["eap", *sys.argv[1:]], prog_name="eap_speed.py")
