"""Write head v2's measured section into the model card (numbers from the JSON only).

python bench/gradmetanet/record_head_v2.py [--result bench/gradmetanet/head_v2.json]
    [--timing bench/gradmetanet/head_v2_124m.json] [--top bench/gradmetanet/head_v2_top.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from gmcurv.gradmetanet.card import update_v2
from gmcurv.gradmetanet.pretrained import CARD_FILE
from gmcurv.io.fileio import atomic_write_text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--result", default="bench/gradmetanet/head_v2.json")
    ap.add_argument("--timing", default="bench/gradmetanet/head_v2_124m.json")
    ap.add_argument("--top", default="bench/gradmetanet/head_v2_top.json")
    args = ap.parse_args(argv)
    res = json.loads(Path(args.result).read_text())
    timing = json.loads(Path(args.timing).read_text()) if Path(args.timing).exists() else None
    top = json.loads(Path(args.top).read_text()) if Path(args.top).exists() else None
    atomic_write_text(CARD_FILE, update_v2(CARD_FILE.read_text(), res, timing, top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
