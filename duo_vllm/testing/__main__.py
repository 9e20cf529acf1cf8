"""`python -m duo_vllm.testing prepare`: convert the test model and fetch the haystack, once."""

from __future__ import annotations

import argparse
import logging

from duo_vllm.testing.haystack import fetch_corpus
from duo_vllm.testing.models import smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m duo_vllm.testing")
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--quiet", action="store_true", help="only log problems")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[duo-vllm] %(message)s")
    model = smollm2_path()
    texts = fetch_corpus()
    if not args.quiet:
        logging.info("test model: %s", model)
        logging.info("haystack texts: %s", texts)


if __name__ == "__main__":
    main()
