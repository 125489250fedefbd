"""What every command-line script shares: a parser whose --help is the script's docstring."""
from __future__ import annotations

import argparse


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """First paragraph of `doc` as the description, the rest (usage examples, limits) as the epilog."""
    summary, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(description=summary, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
