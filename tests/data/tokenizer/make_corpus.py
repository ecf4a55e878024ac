#!/usr/bin/env python3
"""Writes tests/data/tokenizer/corpus.jsonl: the strings of the tokenizer parity test.

Deterministic: the same inputs give the same file. Inputs are Debian's English word list
(/usr/share/dict/words, package wamerican) and WordNet glosses (/usr/share/wordnet, package
wordnet-base), plus the hand-written cases below. Each line is {"id": N, "kind": "...", "text": "..."}.

Usage: python3 tests/data/tokenizer/make_corpus.py [output]   (default: next to this script)
"""

import json
import os
import random
import sys
import unicodedata

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = "/usr/share/dict/words"
WORDNET_DATA = ["/usr/share/wordnet/data.noun", "/usr/share/wordnet/data.verb",
                "/usr/share/wordnet/data.adj", "/usr/share/wordnet/data.adv"]

# Hand-written cases: (kind, text).
HAND = [
    # Empty and whitespace.
    ("empty", ""),
    ("space", " "),
    ("space", "  "),
    ("space", "\t"),
    ("space", "\n"),
    ("space", "\r\n"),
    ("space", " \n \n "),
    ("space", "\n\n\n"),
    ("space", "\t\t  \t"),
    ("space", "    indented code"),
    ("space", "trailing spaces   "),
    ("space", "   leading and trailing   "),
    ("space", "a  b   c    d     e"),
    ("space", "line one\nline two\r\nline three\rline four"),
    ("space", "tab\tseparated\tvalues\t1\t2\t3"),
    ("space", "ends with newline\n"),
    ("space", "\n starts with newline"),
    ("space", "word \n\n  word"),
    ("space", "mixed \t \r\n \u00a0 whitespace"),
    ("space", "no-break\u00a0space and ideographic\u3000space"),
    ("space", "line\u2028separator and paragraph\u2029separator"),
    ("space", "next\u0085line character"),
    ("space", "zero\u200bwidth space"),
    ("space", "\ufeffbyte order mark at start"),
    ("space", "mongolian\u180evowel separator"),
    ("space", "em\u2003space and thin\u2009space"),
    # Characters where regex engines disagree about \s: JavaScript counts U+FEFF and not U+0085,
    # PCRE2 counts U+180E; Unicode White_Space (Oniguruma, tiktoken, duet) is U+0085 only.
    ("space", "a \u0085\u0085 b\u0085\u0085"),
    ("space", "x\u0085 \u0085y ."),
    ("space", "word \ufeff\ufeff word \ufeff"),
    ("space", "\ufeff \ufeff"),
    ("space", "a \u180e\u180e b \u180e"),
    ("space", "tab\t\u0085\n\u180e\ufeff end"),
    # Contractions in several cases.
    ("contraction", "I'M here and I'm fine, don't worry."),
    ("contraction", "DON'T, Don't, don't, dON'T"),
    ("contraction", "we'll we'LL WE'LL we've WE'VE you're YOU'RE he'd HE'D"),
    ("contraction", "it's It's IT'S its' 's 't 're"),
    ("contraction", "o'clock rock'n'roll ma'am y'all"),
    ("contraction", "'s'm'd'll're've't"),
    ("contraction", "She said 'hello' and 'goodbye'."),
    ("contraction", "can't won't shan't couldn't've"),
    ("contraction", "The dog's bone; the dogs' bones."),
    ("contraction", "\u2019s curly apostrophe: don\u2019t I\u2019m"),
    # Numbers.
    ("number", "0"),
    ("number", "1234567890"),
    ("number", "3.14159265358979323846264338327950288419716939937510"),
    ("number", "1,000,000 and 1.000.000 and 1 000 000"),
    ("number", "The year 2024 had 366 days; 2023 had 365."),
    ("number", "0x1F 0b1010 0o777 1e-9 6.02e23 -42 +17"),
    ("number", "12:30:45 2024-01-31T23:59:59Z"),
    ("number", "phone +1 (555) 123-4567 ext. 89"),
    ("number", "v1.2.3-rc.4+build.567"),
    ("number", "1" * 100),
    ("number", "9876543210" * 12),
    ("number", "١٢٣٤٥٦٧٨٩٠ Arabic-Indic digits"),
    ("number", "१२३४५ Devanagari digits and ½ ¾ ² ³ Ⅻ"),
    ("number", "１２３ fullwidth digits"),
    ("number", "$19.99 €5,00 £3 ¥1000 ₹250 ₿0.001"),
    ("number", "50% of 200 = 100; 3/4 + 1/4 = 1"),
    # Code.
    ("code", "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"),
    ("code", "import numpy as np\nx = np.arange(10).reshape(2, 5)\nprint(x.T @ x)\n"),
    ("code", "#include <iostream>\n\nint main() {\n  std::cout << \"Hello, world!\" << std::endl;\n  return 0;\n}\n"),
    ("code", "template <typename T>\nT max(T a, T b) { return a > b ? a : b; }"),
    ("code", "const add = (a, b) => a + b;\nconsole.log(`sum: ${add(1, 2)}`);"),
    ("code", "fn main() {\n    let v: Vec<i32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}"),
    ("code", "package main\n\nimport \"fmt\"\n\nfunc main() {\n\tfmt.Println(\"hi\")\n}\n"),
    ("code", "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;"),
    ("code", "<!DOCTYPE html>\n<html><head><title>Test</title></head><body><p class=\"x\">Hi</p></body></html>"),
    ("code", "{\"name\": \"duet\", \"version\": \"0.1.0\", \"tags\": [\"a\",\"b\"], \"nested\": {\"k\": null}}"),
    ("code", "[{\"a\":1},{\"b\":2}],[\"x\",\"y\"]"),
    ("code", "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n"),
    ("code", "main :: IO ()\nmain = mapM_ print [x * x | x <- [1..10], odd x]"),
    ("code", "if (x != null && y !== undefined || z ?? w) { return !!a; }"),
    ("code", "a+=1;b-=2;c*=3;d/=4;e%=5;f<<=6;g>>=7;h&=8;i|=9;j^=10;"),
    ("code", "    // comment\n    /* block\n       comment */\n    x = 1;  # trailing"),
    ("code", "public static void main(String[] args) throws IOException {}"),
    ("code", "\\begin{equation} e^{i\\pi} + 1 = 0 \\end{equation}"),
    ("code", "https://example.com/path/to/page?query=1&other=two#fragment"),
    ("code", "user.name+tag@example.co.uk"),
    ("code", "C:\\Users\\Name\\Documents\\file.txt"),
    ("code", "| col1 | col2 |\n|------|------|\n| a    | b    |"),
    ("code", "```python\nprint('hi')\n```"),
    ("code", "x=[1,2,3];y={'a':(4,5)};z=x[1:-1]"),
    ("code", "%%%%%%%%%% ========== ---------- __________ ..........!!!!!!!!!!"),
    ("code", "    \n\t\n    return;\n}\n\n\n"),
    # Latin accents and combining marks, in NFC and NFD.
    ("accent", "café naïve résumé coöperate Zürich São Paulo Kraków"),
    ("accent", unicodedata.normalize("NFD", "café naïve résumé coöperate Zürich São Paulo Kraków")),
    ("accent", "Ångström Ørsted Æsir œuvre Straße ĳssel"),
    ("accent", unicodedata.normalize("NFD", "Ångström Ørsted Æsir œuvre Straße")),
    ("accent", "Tiếng Việt có dấu: Người ta nói rằng"),
    ("accent", unicodedata.normalize("NFD", "Tiếng Việt có dấu: Người ta nói rằng")),
    ("accent", "e\u0301\u0302\u0303 stacked combining marks a\u0308\u0304"),
    ("accent", "Z\u0351\u036b\u0343\u036a\u0302\u036b\u033d\u034f\u0334\u0319\u0324\u031e\u0349\u035a\u032f\u031e\u0320\u034dA\u036b\u0357\u0334\u0362\u0335\u031c\u0330\u0354L\u0368\u0367\u0369\u0358\u0320G\u0311\u0357\u030e\u0305\u035b\u0341\u0334\u033b\u0348\u034d\u0354\u0339O\u0342\u030c\u030c\u0358\u0328\u0335\u0339\u033b\u031d\u0333"),
    ("accent", "ÀÉÎÕÜ àéîõü ÇÑ çñ"),
    ("accent", "한국어 텍스트"),
    ("accent", unicodedata.normalize("NFD", "한국어 텍스트")),
    ("accent", "\u212b Angstrom sign and \u2126 Ohm sign (NFC changes them)"),
    ("accent", "ﬁ ﬂ ligatures and ℌ ℍ letterlike"),
    # Non-Latin scripts.
    ("cjk", "你好，世界！这是一个测试。"),
    ("cjk", "日本語のテキストです。ひらがな、カタカナ、漢字。"),
    ("cjk", "東京都渋谷区"),
    ("cjk", "中文English混合mixed文本text"),
    ("cjk", "𠀀𠀁𪚥 supplementary ideographs"),
    ("cjk", "「引用」『二重』【括弧】"),
    ("script", "مرحبا بالعالم! هذا اختبار."),
    ("script", "שלום עולם"),
    ("script", "नमस्ते दुनिया"),
    ("script", "สวัสดีชาวโลก"),
    ("script", "Привет, мир! Ёжик в тумане."),
    ("script", "Γειά σου Κόσμε"),
    ("script", "Բարեւ աշխարհ გამარჯობა სამყარო"),
    ("script", "ሰላም ልዑል"),
    ("script", "வணக்கம் உலகம்"),
    ("script", "English العربية 中文 русский mixed"),
    # Emoji.
    ("emoji", "👍"),
    ("emoji", "👍🏽 👍🏿 👋🏻"),
    ("emoji", "👨\u200d👩\u200d👧\u200d👦 family"),
    ("emoji", "🏳️\u200d🌈 🏴\u200d☠️"),
    ("emoji", "🇫🇷🇩🇪🇯🇵🇺🇸"),
    ("emoji", "1️⃣ 2️⃣ #️⃣"),
    ("emoji", "I ❤️ tokenizers 😀😃😄😁😆"),
    ("emoji", "🧑🏽\u200d💻 coding"),
    ("emoji", "emoji😀without😀spaces"),
    ("emoji", "🫠🫡🥹"),
    ("emoji", "☃ ★ ☎ ✈ ♻"),
    # Special and added tokens written in text.
    ("special", "<|endoftext|>"),
    ("special", "Hello<|endoftext|>World"),
    ("special", "first document<|endoftext|>second document<|endoftext|>"),
    ("special", "<|begin_of_text|>Hello"),
    ("special", "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"),
    ("special", "<s>"),
    ("special", "</s>"),
    ("special", "<s> Hello </s>"),
    ("special", "<s>Hello</s>"),
    ("special", "text <s>inside</s> text"),
    ("special", "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>"),
    ("special", "<think>\nreasoning\n</think>\n\nanswer"),
    ("special", "<|endoftext"),
    ("special", "<|endoftext|"),
    ("special", "<<s>>"),
    ("special", "<s<s>>"),
    ("special", "<|endoftext|><|endoftext|><|endoftext|>"),
    ("special", " <|endoftext|> "),
    ("special", "<unk> <pad> [CLS] [SEP] <mask>"),
    ("special", "<|reserved_special_token_5|> <|fim_prefix|> <|fim_middle|>"),
    # Byte-level and sentencepiece markers written in text.
    ("marker", "\u2581 lower one eighth block \u2581\u2581"),
    ("marker", "\u0120 G with dot \u0120the \u010a"),
    ("marker", "<0x41> <0xFF> <0x0A>"),
    # Control characters.
    ("control", "\x00 NUL and \x07 BEL and \x1b[31mred\x1b[0m"),
    ("control", "\x01\x02\x03\x04\x05\x06\x7f"),
    ("control", "form\x0cfeed and vertical\x0btab"),
    ("control", "\x1c\x1d\x1e\x1f separators"),
    # Punctuation and symbols.
    ("punct", "Hello, world! How are you? I'm fine..."),
    ("punct", "\"Quotes\" 'single' «guillemets» „German“ “curly”"),
    ("punct", "em—dash en–dash hyphen-minus ‐ ellipsis…"),
    ("punct", "!!!???...,,,;;;:::"),
    ("punct", "∀x∈ℝ: x² ≥ 0 ∧ √x ≤ ∞ ≠ ∅"),
    ("punct", "→ ← ↑ ↓ ⇒ ⇔ ∑ ∏ ∫"),
    ("punct", "©®™ §¶ †‡ •·"),
    ("punct", "(((nested))) [[[brackets]]] {{{braces}}}"),
    # Very long words.
    ("long", "a" * 3000),
    ("long", "supercalifragilisticexpialidocious" * 60),
    ("long", "Pneumonoultramicroscopicsilicovolcanoconiosis"),
    ("long", "ab" * 1500),
    ("long", " " * 500 + "x"),
    ("long", "\n" * 300),
    ("long", "😀" * 400),
    ("long", "字" * 1000),
    ("long", "-" * 2000),
    ("long", "x" + "\u0301" * 200),
]


def wordnet_glosses():
    glosses = []
    for path in WORDNET_DATA:
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "| " not in line:
                    continue
                gloss = line.split("| ", 1)[1].strip()
                if gloss:
                    glosses.append(gloss)
    return glosses


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "corpus.jsonl")
    rng = random.Random(20240531)
    with open(WORDS, encoding="utf-8") as f:
        words = [w.strip() for w in f if w.strip()]
    glosses = wordnet_glosses()

    cases = list(HAND)

    # Real English: WordNet glosses, some joined into paragraphs.
    for gloss in rng.sample(glosses, 180):
        cases.append(("wordnet", gloss))
    for _ in range(30):
        cases.append(("wordnet", " ".join(rng.sample(glosses, rng.randint(2, 6)))))
    for _ in range(10):
        cases.append(("wordnet", "\n\n".join(rng.sample(glosses, 4))))

    # Dictionary words (with their possessives and accents) in made-up sentences.
    for _ in range(120):
        n = rng.randint(1, 14)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        style = rng.randint(0, 5)
        if style == 0:
            sentence = sentence.upper()
        elif style == 1:
            sentence = sentence.capitalize() + rng.choice([".", "!", "?", "...", ";", ""])
        elif style == 2:
            sentence = sentence.replace(" ", rng.choice(["  ", "\t", "\n", " \n", "_", "-", ", "]))
        elif style == 3:
            sentence = sentence + " " + str(rng.randint(0, 10 ** rng.randint(1, 12)))
        elif style == 4:
            sentence = rng.choice(["  ", " ", "\n", "\t"]) + sentence + rng.choice(["  ", " ", "\n"])
        cases.append(("words", sentence))

    # Random mixtures of fragments from every kind above.
    fragments = [t for _, t in HAND if 0 < len(t) < 200] + rng.sample(words, 200)
    separators = ["", " ", "  ", "\n", "\t", "\r\n", " \u00a0", "", ""]
    for _ in range(80):
        n = rng.randint(2, 6)
        parts = [rng.choice(fragments) for _ in range(n)]
        text = ""
        for p in parts:
            text += p + rng.choice(separators)
        cases.append(("mix", text))

    # Random code points from chosen blocks (letters, marks, symbols, spaces).
    blocks = [(0x20, 0x7E), (0xA0, 0x17F), (0x300, 0x36F), (0x391, 0x3C9), (0x410, 0x44F),
              (0x5D0, 0x5EA), (0x620, 0x64A), (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x4FFF),
              (0xAC00, 0xAD00), (0x1F300, 0x1F5FF), (0x2000, 0x206F), (0x2190, 0x22FF)]
    for _ in range(40):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(blocks)
            cp = rng.randint(lo, hi)
            if unicodedata.category(chr(cp)) in ("Cn", "Cs", "Co"):
                continue
            chars.append(chr(cp))
        cases.append(("random", "".join(chars)))

    with open(out_path, "w", encoding="utf-8", newline="\n") as f:
        for i, (kind, text) in enumerate(cases):
            line = json.dumps({"id": i, "kind": kind, "text": text}, ensure_ascii=False)
            # Keep one record per physical line for any reader: escape the other line breaks.
            for ch in ("\u0085", "\u2028", "\u2029"):
                line = line.replace(ch, "\\u%04x" % ord(ch))
            f.write(line + "\n")
    print(f"wrote {len(cases)} strings to {out_path}")


if __name__ == "__main__":
    main()
