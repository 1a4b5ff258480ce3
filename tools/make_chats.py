"""Builds fixtures/shakespeare_chats.jsonl, the conversations that the chat
fine-tuning demonstration (docs/finetuning.md) trains on, from the eight history
plays of shakespeare.txt:

    python tools/make_chats.py > fixtures/shakespeare_chats.jsonl

Each conversation asks who speaks a few lines of one of the eight history
plays, and where; the assistant names the speaker, the play, the act and the
scene. Two in three go on: "Who answers?", and the assistant names the next
speaker and quotes their first line. One in two starts with a system message.
Everything is taken from the text by the rules below (speech headings are
lines in capitals ending with a full stop), with a fixed random seed, so the
file is rebuilt exactly. The plays are public domain (Project Gutenberg's
texts, via shakespeare.txt); the conversations are made from them by this
script, and are released with the project under the same terms as the plays.
"""
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The eight history plays, in the order of the story (1398-1485): each one's
# heading in shakespeare.txt, and its name as readers give it.
HISTORIES = {"THE TRAGEDY OF KING RICHARD THE SECOND": "Richard II",
             "KING HENRY IV, THE FIRST PART": "Henry IV, Part 1",
             "KING HENRY IV, SECOND PART": "Henry IV, Part 2",
             "THE LIFE OF KING HENRY V": "Henry V",
             "KING HENRY VI, FIRST PART": "Henry VI, Part 1",
             "HISTORY OF KING HENRY THE SIXTH, SECOND PART": "Henry VI, Part 2",
             "THE HISTORY OF KING HENRY THE SIXTH, THIRD PART": "Henry VI, Part 3",
             "THE LIFE AND DEATH OF KING RICHARD III": "Richard III"}
TITLES = list(HISTORIES.values())
SYSTEM = "You are a guide to Shakespeare's history plays. Answer briefly."
N_CONVERSATIONS = 320
SMALL_WORDS = {"of", "the", "and", "to", "in"}


def name(heading):
    """'KING RICHARD.' -> 'King Richard'; 'DUKE OF YORK.' -> 'Duke of York'."""
    words = heading.rstrip(".").split()
    return " ".join(w.lower() if i and w.lower() in SMALL_WORDS else w.capitalize()
                    for i, w in enumerate(words))


def speeches(text):
    """-> [(play title, act, scene, speaker, [lines])] in the order of the text."""
    out, play, act, scene = [], -1, None, None
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line == "by William Shakespeare":
            play += 1
        elif re.fullmatch(r"ACT \w+\.?", line):
            act = line.split()[1].rstrip(".")
        elif line.startswith("SCENE ") and re.match(r"SCENE [IVXL]+\.", line):
            scene = line.split()[1].rstrip(".")
        elif (act and scene and re.fullmatch(r"[A-Z][A-Z' ,-]*[A-Z]\.", line)
              and i + 1 < len(lines) and lines[i + 1].strip()):
            body = []
            i += 1
            while i < len(lines) and lines[i].strip():
                if not lines[i].strip().startswith("["):
                    body.append(lines[i].strip())
                i += 1
            if body:
                out.append((TITLES[play], act, scene, name(line), body))
            continue
        i += 1
    return out


def conversation(rng, this, following):
    play, act, scene, speaker, body = this
    quote = "\n".join(body[:rng.choice((1, 2, 2, 3))])
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": f"Who says this, and where?\n\n{quote}"},
                 {"role": "assistant",
                  "content": f"{speaker}, in {play}, Act {act}, Scene {scene}."}]
    if following is not None and rng.random() < 2 / 3:
        messages += [{"role": "user", "content": "Who answers?"},
                     {"role": "assistant",
                      "content": f"{following[3]}, who begins: \"{following[4][0]}\""}]
    return {"messages": messages}


def history_plays(text):
    """The eight history plays of shakespeare.txt, in HISTORIES' order, as one
    text. Each play opens with its heading, then "by William Shakespeare"."""
    lines = text.splitlines(keepends=True)
    starts = []  # (line where a play's heading is, the heading)
    for i, line in enumerate(lines):
        if line.strip() == "by William Shakespeare":
            h = i - 1
            while not lines[h].strip():
                h -= 1
            starts.append((h, lines[h].strip()))
    ends = [h for h, _ in starts[1:]] + [len(lines)]
    plays = {heading: "".join(lines[h:end]) for (h, heading), end in zip(starts, ends)}
    missing = [heading for heading in HISTORIES if heading not in plays]
    if missing:
        sys.exit(f"error: shakespeare.txt lacks {missing}")
    return "".join(plays[heading] for heading in HISTORIES)


def main():
    text = history_plays((ROOT / "shakespeare.txt").read_text(encoding="utf-8"))
    all_speeches = speeches(text)
    rng = random.Random(0)
    picks = sorted(rng.sample(range(len(all_speeches) - 1), N_CONVERSATIONS))
    for i in picks:
        this, nxt = all_speeches[i], all_speeches[i + 1]
        same_scene = nxt[:3] == this[:3] and nxt[3] != this[3]
        sys.stdout.write(json.dumps(conversation(rng, this, nxt if same_scene else None),
                                    ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
