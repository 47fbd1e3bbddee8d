"""``python -m nhi_gateway.lookalike --state-dir DIR [--host H] [--port N]``"""

import argparse
import logging
from pathlib import Path

from nhi_gateway.lookalike.server import INFO_FILE, run


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m nhi_gateway.lookalike",
        description="Serve look-alikes of login.microsoftonline.com and graph.microsoft.com on one HTTPS port.",
    )
    parser.add_argument("--state-dir", type=Path, required=True,
                        help=f"keys, certificates and secrets live here; {INFO_FILE} is written here once listening")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default) picks a free port")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(args.state_dir, args.host, args.port)


if __name__ == "__main__":
    main()
