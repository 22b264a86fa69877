"""Write the calibration and evaluation texts streamq uses on a machine with no dataset hub:
calibration = the Python language reference shipped with CPython (pydoc_data.topics);
evaluation = the documentation of docutils 0.21.2 (public domain), from its PyPI sdist.
Two different sources, as the paper keeps Pile (calibration) apart from wikitext-2 (evaluation).

    python tools/make_texts.py --out data/
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from streamq import assets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", type=Path, default=assets.cache_dir(), help="where downloads are cached")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for made in (assets.calibration_text(args.cache), assets.evaluation_text(args.cache)):
        target = args.out / made.name
        if target.resolve() != made.resolve():
            shutil.copyfile(made, target)
        print(f"{target}: {target.stat().st_size:,} bytes, sha256 {assets.sha256_text(target)}")


if __name__ == "__main__":
    main()
