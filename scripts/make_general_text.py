"""Build data/general/wikitext.txt: general English prose that `feathertune eval --forgetting` scores.

    python scripts/make_general_text.py [TEST_FILE VALID_FILE]   (default: /tmp/wt2test.txt /tmp/wt2valid.txt)

Source: the test and validation splits of WikiText-2 (Merity et al. 2016, "Pointer Sentinel Mixture
Models", arXiv:1609.07843), articles from Wikipedia's Good and Featured articles, license CC BY-SA 3.0.
The files read are the tokenized `test.txt` and `valid.txt` that github.com/pytorch/examples ships in
word_language_model/data/wikitext-2/ (their sha256 are in SOURCES below; the same text as the
"wikitext-2-v1" splits):

    base=https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2
    curl -L $base/test.txt -o /tmp/wt2test.txt; curl -L $base/valid.txt -o /tmp/wt2valid.txt
    python scripts/make_general_text.py

A paragraph is kept when it is
- body text: a line that is neither blank nor a heading (`= Title =`, `= = Section = =`);
- complete: no `<unk>` (WikiText's stand-in for its rare words; 92% of the test split's paragraphs
  have one, which is why the validation split is read too: the test split alone has 37 to keep);
- 40 to 200 words long, counted after detokenizing;
- unambiguous to detokenize: its double quotes pair up, and it has no standalone `'` or `’`, which
  WikiText uses both for a plural possessive ("ships ' hulls") and for single quotes ("a ' perfect '
  ironclad") with nothing to tell them apart.
Every such paragraph is written, one a line, the test split's first, each in file order: 78
paragraphs, 5,783 words, 7,937 SmolLM2 tokens (one pass of SmolLM2-135M: about 35 s on 2 CPU cores).

Detokenizing undoes WikiText's tokenization: ` @-@ ` -> `-`, ` @,@ ` -> `,`, ` @.@ ` -> `.`; no space
before `, . ; : ! ? % ) ]` or the clitics `'s n't 're 've 'll 'd 'm`; none after `( [ $ £`; paired
`" ... "` tightened to `"..."`; em dashes, slashes and non-breaking hyphens closed up (Wikipedia's
style), en dashes and colons closed up between digits (2000–2005, 21:00). Standard library only, no randomness: a rerun
writes the same bytes (tests/test_forgetting.py checks it where the source files are present).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "data" / "general" / "wikitext.txt"
# The splits read, in this order: default path and sha256 of pytorch/examples' copy.
SOURCES = {
    "test.txt": (Path("/tmp/wt2test.txt"), "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0"),
    "valid.txt": (Path("/tmp/wt2valid.txt"), "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"),
}

MIN_WORDS, MAX_WORDS = 40, 200
HEADING = re.compile(r"^=( =)* .* =( =)*$")
STANDALONE_APOSTROPHE = re.compile(r"(^| )['’]( |$)")

# (pattern, replacement) applied in order to a tokenized paragraph.
DETOKENIZE = [
    (re.compile(r" @([-,.])@ "), r"\1"),                      # 1 @,@ 000 -> 1,000; state @-@ of -> state-of
    (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m|'t)\b"), r"\1"),  # did n't, Teddy 's -> didn't, Teddy's
    (re.compile(r"(\d) : (\d)"), r"\1:\2"),                   # times and scores: 21 : 00 -> 21:00
    (re.compile(r" ([,.;:!?%)\]])"), r"\1"),
    (re.compile(r"([(\[$£]) "), r"\1"),
    (re.compile(r" ([—/‑]) "), r"\1"),                    # em dash, slash, non-breaking hyphen (M‑95)
    (re.compile(r"(\d) – (\d)"), r"\1–\2"),
]


def detokenize(line: str) -> str:
    """WikiText's tokenized paragraph as plain prose (see the module docstring for the rules)."""
    text = _tighten_quotes(line.split())
    for pattern, replacement in DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text


def _tighten_quotes(tokens: list[str]) -> str:
    """`he said " yes , fine "` -> `he said "yes , fine"`: odd quote tokens open, even ones close."""
    out: list[str] = []
    opening = True
    for n, token in enumerate(tokens):
        if token == '"' and opening and n + 1 < len(tokens):
            tokens[n + 1] = '"' + tokens[n + 1]
            opening = False
        elif token == '"' and not opening and out:
            out[-1] += '"'
            opening = True
        else:
            out.append(token)
    return " ".join(out)


def paragraphs(lines: list[str]) -> list[str]:
    """The kept paragraphs of a WikiText file, detokenized, in file order."""
    kept = []
    for line in lines:
        stripped = line.strip()
        if not stripped or HEADING.match(stripped) or "<unk>" in stripped:
            continue
        if stripped.count('"') % 2 or STANDALONE_APOSTROPHE.search(stripped):
            continue
        text = detokenize(stripped)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            kept.append(text)
    return kept


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="*", default=[str(path) for path, _ in SOURCES.values()],
                        metavar="FILE", help=f"WikiText-2's tokenized {' and '.join(SOURCES)}, in this order "
                                            f"(default: {' '.join(str(p) for p, _ in SOURCES.values())})")
    parser.add_argument("--out", default=str(OUT), help=f"where to write (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    if len(args.sources) != len(SOURCES):
        parser.error(f"give {len(SOURCES)} files, {' and '.join(SOURCES)}, or none for the defaults")
    chosen = []
    for source, (name, (_, sha256)) in zip(map(Path, args.sources), SOURCES.items()):
        if not source.is_file():
            print(f"error: {source} does not exist; download WikiText-2's {name} as this script's docstring "
                  f"says and pass its path", file=sys.stderr)
            return 2
        data = source.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            print(f"warning: {source} is not the {name} the shipped file was built from (its sha256 differs), "
                  f"so the output will differ from it", file=sys.stderr)
        chosen += paragraphs(data.decode("utf-8").splitlines())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(p + "\n" for p in chosen), encoding="utf-8")
    print(f"{out}: {len(chosen)} paragraphs, {sum(len(p.split()) for p in chosen)} words", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
