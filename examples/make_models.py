"""Write the sample models (random weights, no downloads) as torch.export archives.

    .venv/bin/python examples/make_models.py out/models
"""

import sys
from pathlib import Path

from coordinator.samples import SAMPLES, write_sample


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "out/models")
    for name, builder in SAMPLES.items():
        path = write_sample(builder, folder / f"{name}.pt2")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
