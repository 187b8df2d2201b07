"""Write tests/fixtures/tokenizer_prompts.json: prompts and the ids the reference tokenizers give them.

    .venv/bin/python tools/make_tokenizer_fixture.py [--openai-simple-tokenizer PATH]

The reference is transformers' ``CLIPTokenizer``, built from the files that our
``CLIPTokenizer.save()`` writes (SD1.x: pad "<|endoftext|>"; SD2.x: pad "!"). The prompts are built
here, deterministically (fixed lists plus their combinations).

What transformers 5.23 is (checked by reading its source and by running it):

* ``transformers.CLIPTokenizer`` is the tokenizers-backed (fast) class; there is no slow, pure-Python
  CLIP tokenizer any more and ``use_fast=False`` gives the same class. It never calls ftfy, so none of
  the transformers tokenizers does OpenAI's ftfy cleaning. Its normalizer is NFC, ``\\s+`` -> " ",
  lower-case. So, unlike openai/CLIP (ftfy.fix_text, html.unescape twice), it leaves HTML entities
  ("&amp;" -> "&", "amp", ";"), curly quotes, full-width letters, ligatures and mojibake as they are.
* Its lower-casing maps each character alone: "ΟΔΟΣ" ends in "σ", where str.lower() gives "ς".
* Its CLIP split pattern has no IGNORECASE: "'ſ" is two pieces (OpenAI: one, "ſ" folds to "s").
* Special tokens are cut out of the text before normalization (or after it, for tokens flagged
  ``"normalized": true``), anywhere in the text. With an SD2.x folder the pad token "!" is such a
  token, so every "!" in a prompt becomes id 0 instead of "!</w>" (256) or "!!!</w>" (995).
* A literal "<|endoftext|>" that is not cut out (SD1.x folders match it case-sensitively in the raw
  text, so "<|ENDOFTEXT|>") is re-split by the ByteLevel pre-tokenizer into "<|", "endoftext", "|>".
* Ids can differ from ours for code points that Python 3.11's Unicode 14 tables leave unassigned
  (letters, numbers and case pairs added since): the Unicode tables of the regex module, Oniguruma
  and Rust disagree there. A one-off sweep of every code point (alone, doubled, upper-cased, between
  letters) against transformers found no other difference; 32000 random strings found none either.

The ``openai_encode`` field (written only where it differs from ``encode``) comes from openai/CLIP's
own ``simple_tokenizer.py``, given with --openai-simple-tokenizer (it needs only ftfy and regex; get it
with ``pip download openai-clip --no-deps``). Without that option the field is left out and the
fixture says so (``"openai_reference": null``); the tests then skip the OpenAI comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tokenizer_prompts.json"
MAX_LENGTH = 77

try:
    from stablediff.tokenizer import CLIPTokenizer
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT / "src"))
    from stablediff.tokenizer import CLIPTokenizer

SUBJECTS = [
    "a photo of an astronaut riding a horse",
    "a cat",
    "portrait of a young woman",
    "a red sports car",
    "the eiffel tower at night",
    "an old man with a beard",
    "a bowl of ramen",
    "two dogs playing in the snow",
    "a castle on a hill",
    "a robot reading a book",
]
STYLES = [
    "",
    ", oil painting",
    ", highly detailed, 8k",
    " by greg rutkowski and alphonse mucha",
    ", trending on artstation!",
    " (masterpiece:1.2)",
    " -- unreal engine 5",
    "\n\nstudio lighting",
]
FIXED = [
    # empty and whitespace only
    "",
    " ",
    "   ",
    "\t",
    "\n",
    "\r\n",
    "\u00a0",
    "\u3000",
    " \t\n ",
    # ordinary prompts
    "A photo of an astronaut riding a horse on mars",
    "a beautiful landscape, sunset, golden hour",
    "cyberpunk city street at night, neon lights, rain, reflections",
    "a watercolor painting of a fox",
    "isometric 3d render of a tiny house",
    "macro photograph of a dew drop on a leaf",
    "a corgi wearing sunglasses, digital art",
    "close-up portrait, 85mm, f/1.8, bokeh",
    "low poly, pastel colors, minimalistic",
    "a bustling marketplace in marrakech",
    # punctuation and digits
    "hello, world!",
    "what?!",
    "wow!!!",
    "...",
    "a...b",
    "--ar 16:9",
    "1girl, solo, long hair",
    "a 1024x768 image",
    "3.14159",
    "$100 bill",
    "100% cotton",
    "2023-11-26",
    "12:30 pm",
    "#hashtag @user",
    "e=mc^2",
    "a/b\\c|d",
    "under_score",
    "semi;colon",
    "[bracket]",
    "{brace}",
    "<angle>",
    "`code`",
    "~tilde~",
    "a*b+c",
    'quote "inside" quotes',
    "50/50",
    "v1.5",
    "sd2.1",
    "x1.25 zoom",
    "0",
    "007",
    "9999999999",
    "1st 2nd 3rd 4th",
    # apostrophes and contractions
    "it's",
    "don't",
    "we're",
    "i've",
    "i'm",
    "we'll",
    "he'd",
    "IT'S",
    "DON'T",
    "We'Re",
    "rock 'n' roll",
    "''quoted''",
    "'s",
    "'t",
    "o'clock",
    "the cat's toy",
    "dogs' park",
    "y'all'd've",
    "'ſ",
    "it'ſ",
    # curly quotes, dashes and other typography (ftfy changes some of these)
    "don\u2019t",
    "\u2018single\u2019",
    "\u201cdouble\u201d",
    "em\u2014dash",
    "en\u2013dash",
    "ellipsis\u2026",
    "\u00abguillemets\u00bb",
    "bullet \u2022 point",
    "\u00a9 2024",
    "trade\u2122",
    "\u00b0c",
    "\u00bd cup",
    # casing
    "PHOTO OF A CAT",
    "pHoTo Of A cAt",
    "McDonald",
    "iPhone",
    "\u0130stanbul",
    "STRASSE stra\u00dfe",
    "\u1e9e",
    "\u01c5ungla",
    "\u039f\u0394\u039f\u03a3",
    "\u03a3\u03af\u03c3\u03c5\u03c6\u03bf\u03c2",
    "\u00c5ngstr\u00f6m",
    "\u212bngstr\u00f6m",
    "\u212a kelvin",
    # accents, NFC/NFD
    "caf\u00e9",
    "cafe\u0301",
    "na\u00efve",
    "S\u00e3o Paulo",
    "Z\u00fcrich",
    "cr\u00e8me br\u00fbl\u00e9e",
    "A\u030angstrom",
    "\u1ebf",
    "e\u0302\u0301",
    "ni\u00f1o",
    "\u0142\u00f3d\u017a",
    # scripts
    "\u041c\u043e\u0441\u043a\u0432\u0430",
    "\u0627\u0644\u0642\u0627\u0647\u0631\u0629",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\uc11c\uc6b8",
    "\u6771\u4eac\u30bf\u30ef\u30fc",
    "\u4e00\u53ea\u732b",
    "\u5bcc\u58eb\u5c71 mount fuji",
    "\u3072\u3089\u304c\u306a",
    "\u10e1\u10d0\u10e5\u10d0\u10e0\u10d7\u10d5\u10d4\u10da\u10dd",
    "\u0391\u03b8\u03ae\u03bd\u03b1",
    "\u0531\u0580\u0574\u0565\u0576\u056b\u0561",
    # digits of other scripts, letter-like numbers
    "\u0663\u0664\u0665",
    "\u0967\u0968",
    "\u2460\u2461",
    "\u00b2\u00b3",
    "\u216b",
    "\uff11\uff12\uff13",
    # emoji
    "\U0001f431",
    "a cat \U0001f431 and a dog \U0001f436",
    "\U0001f469\u200d\U0001f680",
    "\U0001f1ef\U0001f1f5",
    "\U0001f44d\U0001f3fd",
    "\u2764\ufe0f",
    "\U0001f600\U0001f600\U0001f600",
    "\u2b50 star",
    # full width, ligatures, odd code points
    "\uff21\uff22\uff23",
    "\ufb01ne \ufb02ower",
    "\u00a0non\u00a0breaking\u00a0",
    "zero\u200bwidth",
    "\ufeffbom",
    "soft\u00adhyphen",
    "\u2003em space",
    "tab\tseparated\tvalues",
    "line\nbreaks\n\nhere",
    "many     spaces",
    "\x00null",
    "\x1b[31mred\x1b[0m",
    "bell\x07",
    "del\x7f",
    "\u2028line sep",
    "\x1ccontrol",
    "\x85nel",
    # mojibake (ftfy repairs these)
    "caf\u00c3\u00a9",
    "don\u00e2\u20ac\u2122t",
    "\u00e2\u20ac\u0153hello\u00e2\u20ac\x9d",
    # HTML entities
    "tom &amp; jerry",
    "&lt;b&gt;bold&lt;/b&gt;",
    "it&#39;s",
    "&quot;quoted&quot;",
    "&amp;amp;",
    "&nbsp;",
    "&#x27;hex&#x27;",
    "<b>bold</b> &amp; more",
    "&copy; 2024",
    "&unknown;",
    "5 &gt; 3",
    # prompt weighting and other front-end syntax
    "(red:1.3)",
    "((masterpiece))",
    "[blue|green]",
    "{cat}",
    "(best quality:1.2), (ultra detailed:1.1)",
    "<lora:foo_v2:0.8>",
    "a cat AND a dog",
    "sky BREAK grass",
    "[cat:dog:0.5]",
    "embedding:bad-hands-5",
    "(worst quality, low quality:1.4)",
    "\\(escaped\\)",
    "a (((very))) [[small]] cat",
    # special tokens written in the text
    "<|startoftext|>",
    "<|endoftext|>",
    "a <|endoftext|> b",
    "<|ENDOFTEXT|>",
    "A<|StartOfText|>B",
    "!<|endoftext|>",
    "<|endoftext|>!",
    "<|startoftext|><|endoftext|>",
    "<|endoftext",
    "|endoftext|>",
    # long words and repetitions (BPE merge order)
    "a" * 50,
    "ha" * 30,
    "!" * 40,
    "." * 33,
    "abcdefghijklmnopqrstuvwxyz" * 4,
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "aaaa aaaa aaaa",
    "xxxxxxxxxx yyyyyyyyyy",
]


def build_prompts() -> list[str]:
    """At least 300 prompts, always the same ones in the same order."""
    prompts = list(FIXED)
    prompts += [s + st for s, st in product(SUBJECTS, STYLES)]
    # every odd fixed string spliced into an ordinary prompt, so context around it is exercised too
    prompts += [f"a photo of {x} in the style of monet" for x in FIXED[9::3]]
    # far beyond 77 tokens: truncation keeps the first 75
    prompts += [", ".join(SUBJECTS) * k for k in (2, 3, 6)]
    prompts += [" ".join(f"word{i}" for i in range(120)), "masterpiece, " * 60, "\U0001f431" * 100]
    prompts = list(dict.fromkeys(prompts))  # drop duplicates, keep order
    assert len(prompts) >= 300, len(prompts)
    return prompts


def write_hub_style_folder(folder: Path, saved: Path, pad_token: str) -> None:
    """A tokenizer folder shaped like the SD1.5 / SD2.1 ones on the hub: special tokens as
    ``__type: AddedToken`` dicts with ``normalized: true``, the pad token a plain string."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((saved / name).read_bytes())

    def added(content: str, typed: bool) -> dict:
        flags = {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"__type": "AddedToken", **flags} if typed else flags

    config = {
        "add_prefix_space": False,
        "bos_token": added("<|startoftext|>", True),
        "do_lower_case": True,
        "eos_token": added("<|endoftext|>", True),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added("<|endoftext|>", True),
    }
    special_map = {
        "bos_token": added("<|startoftext|>", False),
        "eos_token": added("<|endoftext|>", False),
        "pad_token": pad_token,
        "unk_token": added("<|endoftext|>", False),
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2))


def load_openai(path: str):
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    vocab_gz = ROOT / "src" / "stablediff" / "data" / "bpe_simple_vocab_16e6.txt.gz"
    return module.SimpleTokenizer(str(vocab_gz))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--openai-simple-tokenizer", help="path to openai/CLIP's clip/simple_tokenizer.py")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()

    import tokenizers
    import transformers
    from transformers import CLIPTokenizer as HFTokenizer

    prompts = build_prompts()
    with tempfile.TemporaryDirectory() as tmp:
        ref = {}
        for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
            saved = CLIPTokenizer.default(pad_token=pad).save(Path(tmp) / name)
            write_hub_style_folder(Path(tmp) / f"{name}_hub", saved, pad)
            ref[name] = HFTokenizer.from_pretrained(str(saved))
            hub = HFTokenizer.from_pretrained(str(Path(tmp) / f"{name}_hub"))
            # our saved folder must mean the same to transformers as the real hub folder does
            same = (
                ref[name](prompts, add_special_tokens=False).input_ids
                == hub(prompts, add_special_tokens=False).input_ids
            )
            assert same, f"transformers reads our {name} folder differently from a hub-style one"

    def padded(tok, texts):
        """transformers' padded ids, cut where its attention mask ends (the rest is all pad_id)."""
        out = tok(texts, padding="max_length", max_length=MAX_LENGTH, truncation=True)
        cut = []
        for ids, mask in zip(out.input_ids, out.attention_mask, strict=True):
            n = sum(mask)
            assert len(ids) == MAX_LENGTH and set(ids[n:]) <= {tok.pad_token_id}, ids
            cut.append(ids[:n])
        return cut

    encode = ref["sd1"](prompts, add_special_tokens=False).input_ids
    input_ids = padded(ref["sd1"], prompts)
    # SD2 padding: every prompt with a "!" (where SD2 differs) and a few ordinary ones
    sd2_prompts = [p for p in prompts if "!" in p] + prompts[9:29]
    sd2 = dict(zip(sd2_prompts, padded(ref["sd2"], sd2_prompts), strict=True))
    openai = load_openai(args.openai_simple_tokenizer) if args.openai_simple_tokenizer else None

    records = []
    for text, enc, ids in zip(prompts, encode, input_ids, strict=True):
        record = {"text": text, "encode": enc, "input_ids": ids}
        if text in sd2:
            record["sd2_input_ids"] = sd2[text]
        if openai is not None and openai.encode(text) != enc:
            record["openai_encode"] = openai.encode(text)
        records.append(record)

    header = {
        "about": "CLIP token ids per prompt; written by tools/make_tokenizer_fixture.py, do not edit",
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "openai_reference": "openai/CLIP clip/simple_tokenizer.py" if openai else None,
        "max_length": MAX_LENGTH,
        "pad_id": {"sd1": ref["sd1"].pad_token_id, "sd2": ref["sd2"].pad_token_id},
        "input_ids": "transformers' ids padded to max_length, with the padding cut off: pad back with pad_id",
        "count": len(records),
    }
    # one prompt per line keeps the file readable and its diffs small
    body = ",\n".join("    " + json.dumps(r) for r in records)
    head = json.dumps(header, indent=2)[:-2]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(f'{head},\n  "prompts": [\n{body}\n  ]\n}}\n')
    n_openai = sum("openai_encode" in r for r in records)
    print(f"{args.out}: {len(records)} prompts, {len(sd2)} with SD2 padding, {n_openai} where OpenAI differs")


if __name__ == "__main__":
    main()
