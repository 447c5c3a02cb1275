"""EAP fast path vs the reference-shaped faithful path (and ESD-x), measured side by side in one run.

    python benchmarks/eap_speed.py [--images-per-class 20] [--no-sd14]

The last line is one JSON object with the ratios (issue 7's keys).
"""

from __future__ import annotations

import argparse
import json

from erasekit.bench import eap_speed

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images-per-class", type=int, default=20)
    parser.add_argument("--no-sd14", action="store_true", help="skip the SD-1.4-architecture step timing")
    args = parser.parse_args()
    result = eap_speed(images_per_class=args.images_per_class, sd14=not args.no_sd14)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
