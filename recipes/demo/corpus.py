"""Seeded synthetic corpus for the demo model: training documents and held-out evaluation prompts.

Task families (each mirrors one example of the QK-attribution paper):

* induction: "I always loved visiting Aunt Sally. ... Whenever I was feeling sad, Aunt" -> " Sally",
  and two-token names ("Aunt Mary Sue ... Aunt Mary" -> " Sue"); names are random per document.
* antonyms in English and French: 'Le contraire de "petit" est "' -> "grand".
* multiple choice over a small world of facts: "... (B) Paris ...\nAnswer: (" -> "B".
* yes/no correctness of facts ("The color of a banana is yellow? Yes") and of sums ("18+5=23? Yes").
* filler prose (people, places, objects, fact statements, true sums).

Held-out splits: induction uses templates never seen in training (and names that training shows only
in plain prose, never after a title); antonyms, multiple choice and yes/no facts hold out (template, item) combinations;
sums hold out (a, b) pairs. Every eval item is a prompt ending right before a single answer token.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

from .world import (
    ADJECTIVES,
    ALL_NAMES,
    ANTONYMS_EN,
    ANTONYMS_FR,
    COLORS,
    FACTS,
    HELDOUT_NAMES,
    OBJECTS,
    PLACES,
    TITLES,
    TRAIN_NAMES,
    Fact,
    category_values,
)


@dataclass(frozen=True)
class EvalItem:
    """One held-out prompt and the single token that should follow it."""

    family: str
    prompt: str
    answer: str


def is_heldout(key: str, percent: int) -> bool:
    """Stable (process-independent) membership of `key` in a held-out split of `percent`%."""
    return zlib.crc32(key.encode()) % 100 < percent


# ----------------------------------------------------------------------------------------- induction
INTROS_TRAIN = (
    "I always loved visiting {X}.",
    "Yesterday we had dinner with {X}.",
    "My favorite teacher was {X}.",
    "Everyone in town knew {X}.",
    "Last summer I went fishing with {X}.",
    "The letter was signed by {X}.",
    "We met {X} at the station.",
    "The house on the hill belonged to {X}.",
    "{X} lived next to the old bakery.",
    "{X} always told the best stories.",
    "When I was young, {X} taught me to swim.",
    "The party was organized by {X}.",
)
INTROS_HELDOUT = ("Nobody could cook like {X}.", "On Sundays we called {X}.", "The garden was kept by {X}.")
FINALS_TRAIN = (
    "Whenever I was feeling sad, {T}",
    "The next morning, {T}",
    "After a while, {T}",
    "Of course, {T}",
    "I still remember how {T}",
    "Then {T}",
    "Everyone agreed that {T}",
    "That night, {T}",
)
FINALS_HELDOUT = ("Years later, {T}", "In the end, {T}")
MIDDLES = (
    "{Y} came by later that day.",
    "We also saw {Y} at the market.",
    "{Y} brought a cake.",
    "Later, {Y} called to say hello.",
    "It rained all afternoon.",
    "The weather was cold and windy.",
)
ENDINGS = (" smiled.", " laughed and hugged me.", " said goodbye.", " was right.", " came home.")

# ---------------------------------------------------------------------------------------- antonyms
# (prefix, answer format, suffix); the answer format decides whether the answer has a leading space.
ANT_TEMPLATES = {
    "en": (
        ("The opposite of {a} is", " {b}", "."),
        ('The opposite of "{a}" is "', "{b}", '".'),
        ("The antonym of {a} is", " {b}", "."),
        ("What is the opposite of {a}? It is", " {b}", "."),
        ('The word "{a}" means the opposite of "', "{b}", '".'),
        ("Q: opposite of {a}? A:", " {b}", ""),
    ),
    "fr": (
        ('Le contraire de "{a}" est "', "{b}", '".'),
        ("Le contraire de {a} est", " {b}", "."),
        ("L'opposé de {a} est", " {b}", "."),
        ('Le mot "{a}" est le contraire de "', "{b}", '".'),
        ("Quel est le contraire de {a} ? C'est", " {b}", "."),
    ),
}
ANT_PAIRS = {"en": ANTONYMS_EN, "fr": ANTONYMS_FR}

# --------------------------------------------------------------------- multiple choice and yes/no
MC_TEMPLATES = (
    ("Question: {q}\n{opts}\nAnswer: (", ")"),
    ("Q: {q}\n{opts}\nA: (", ")"),
    ("Human: {q}\n{opts}\nAssistant: Answer: (", ")"),
)
YN_TEMPLATES = ("{s}?", "Answer with yes or no. {s}?", "True or false: {s}? Answer:")
LETTERS = "ABCD"

# -------------------------------------------------------------------------------------------- filler
FILLER = (
    "{N} walked to the {place} with a {adj} {obj}.",
    "The {obj} in the {place} was {color}.",
    "{N} and {M} played in the {place} all day.",
    "{N} bought a {color} {obj} at the {place}.",
    "It was a quiet day at the {place}.",
    "{N} lost a {adj} {obj} near the {place}.",
    "There is a {color} {obj} on the table.",
    "{N} wrote a letter to {M}.",
    "{N} est allé au marché avec {M}.",
    "Il y a un livre sur la table.",
    "{N} aime beaucoup le jardin.",
)

SUM_TEMPLATES = ("{a}+{b}={c}?", "Answer with yes or no. {a}+{b}={c}?", "Is {a}+{b}={c}?")
SUM_A = range(10, 60)
SUM_B = range(1, 10)


def sum_heldout(a: int, b: int) -> bool:
    """About 15% of the (a, b) pairs never appear in training, in any form."""
    return is_heldout(f"sum|{a}|{b}", 15)


# Segment mixtures as cumulative upper bounds of a uniform draw (the rest is filler).
# Stage 1 trains from scratch; stage 2 continues from stage 1 with more weight on facts, multiple
# choice and yes/no, and comma-free name sequences (general induction on any name token).
MIX_STAGE1: tuple[tuple[str, float], ...] = (
    ("induction", 0.28),
    ("name_list", 0.34),
    ("antonym_en", 0.44),
    ("antonym_fr", 0.54),
    ("multiple_choice", 0.70),
    ("yes_no_fact", 0.81),
    ("yes_no_sum", 0.91),
)
MIX_STAGE2: tuple[tuple[str, float], ...] = (
    ("induction", 0.16),
    ("name_seq", 0.20),
    ("antonym_en", 0.27),
    ("antonym_fr", 0.34),
    ("fact", 0.46),
    ("multiple_choice", 0.68),
    ("yes_no_fact", 0.84),
    ("yes_no_sum", 0.94),
)
MIXES = {"stage1": MIX_STAGE1, "stage2": MIX_STAGE2}


class CorpusGenerator:
    """Generates training segments/documents (train split) or eval items (held-out split)."""

    def __init__(self, seed: int, mix: tuple[tuple[str, float], ...] = MIX_STAGE1) -> None:
        self.rng = random.Random(seed)
        self.mix = mix

    # --- helpers --------------------------------------------------------------------------------
    def _names(self, k: int, pool: tuple[str, ...]) -> list[str]:
        return self.rng.sample(pool, k)

    def filler(self) -> str:
        r = self.rng
        if r.random() < 0.25:
            f = r.choice(FACTS)
            return f"{f.stem} {f.value}."
        if r.random() < 0.1:
            a, b = r.choice(SUM_A), r.choice(SUM_B)
            while sum_heldout(a, b):
                a, b = r.choice(SUM_A), r.choice(SUM_B)
            return f"{a}+{b}={a + b}."
        # held-out names occur in plain prose (so their embeddings are trained), never in an induction
        # pattern: the "unseen names" eval asks for induction on names only ever met in prose
        n, m = self._names(2, HELDOUT_NAMES if r.random() < 0.2 else TRAIN_NAMES)
        return r.choice(FILLER).format(
            N=n, M=m, place=r.choice(PLACES), obj=r.choice(OBJECTS), color=r.choice(COLORS), adj=r.choice(ADJECTIVES)
        )

    # --- induction ------------------------------------------------------------------------------
    def induction(
        self,
        heldout: bool,
        two_token: bool,
        names: tuple[str, ...] = TRAIN_NAMES,
    ) -> tuple[str, str, str]:
        """Returns (prefix, answer, suffix); prefix ends with the title (or title + first name)."""
        r = self.rng
        intros, finals = (INTROS_HELDOUT, FINALS_HELDOUT) if heldout else (INTROS_TRAIN, FINALS_TRAIN)
        titles = r.sample(TITLES, 3)
        first, second, d1, d2, d3 = self._names(5, names)
        full = f"{titles[0]} {first} {second}" if two_token else f"{titles[0]} {first}"
        parts = [r.choice(intros).format(X=full)]
        distractors = [f"{titles[1]} {d1}", f"{titles[2]} {d2} {d3}" if r.random() < 0.3 else f"{titles[2]} {d2}"]
        for i in range(r.choice((1, 1, 2, 2, 3))):
            parts.append(r.choice(MIDDLES).format(Y=distractors[i % 2]) if r.random() < 0.7 else self.filler())
        prefix = " ".join(parts) + " " + r.choice(finals).format(T=titles[0])
        ending = r.choice(ENDINGS)
        if two_token:
            return prefix + " " + first, " " + second, ending
        return prefix, " " + first, ending

    # --- antonyms -------------------------------------------------------------------------------
    def antonym(self, lang: str, heldout: bool) -> tuple[str, str, str]:
        r = self.rng
        pairs, templates = ANT_PAIRS[lang], ANT_TEMPLATES[lang]
        while True:
            a, b = r.choice(pairs)
            if r.random() < 0.5:
                a, b = b, a
            tid = r.randrange(len(templates))
            if is_heldout(f"ant|{lang}|{tid}|{a}", 20) == heldout:
                pre, ans, suf = templates[tid]
                return pre.format(a=a), ans.format(b=b), suf

    # --- multiple choice ------------------------------------------------------------------------
    def multiple_choice(self, heldout: bool) -> tuple[str, str, str]:
        r = self.rng
        while True:
            fact = r.choice(FACTS)
            n_opts = r.choice((3, 3, 4))
            pool = [v for v in category_values(fact.category) if v != fact.value]
            opts = r.sample(pool, min(n_opts - 1, len(pool))) + [fact.value]
            r.shuffle(opts)
            tid = r.randrange(len(MC_TEMPLATES))
            if is_heldout(f"mc|{fact.question}|{'|'.join(opts)}|{tid}", 20) == heldout:
                lines = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(opts))
                pre, suf = MC_TEMPLATES[tid]
                return pre.format(q=fact.question, opts=lines), LETTERS[opts.index(fact.value)], suf

    # --- yes / no -------------------------------------------------------------------------------
    def yes_no_fact(self, heldout: bool) -> tuple[str, str, str]:
        r = self.rng
        while True:
            fact: Fact = r.choice(FACTS)
            correct = r.random() < 0.5
            value = fact.value if correct else r.choice([v for v in category_values(fact.category) if v != fact.value])
            tid = r.randrange(len(YN_TEMPLATES))
            if is_heldout(f"yn|{fact.stem}|{value}|{tid}", 20) == heldout:
                s = f"{fact.stem} {value}"
                return YN_TEMPLATES[tid].format(s=s), " Yes" if correct else " No", ""

    def yes_no_sum(self, heldout: bool) -> tuple[str, str, str]:
        r = self.rng
        while True:
            a, b = r.choice(SUM_A), r.choice(SUM_B)
            if sum_heldout(a, b) == heldout:
                break
        correct = r.random() < 0.5
        c = a + b if correct else a + b + r.choice((-2, -1, 1, 2))
        return r.choice(SUM_TEMPLATES).format(a=a, b=b, c=c), " Yes" if correct else " No", ""

    # --- documents ------------------------------------------------------------------------------
    def induction_train(self) -> tuple[str, list[tuple[int, int]]]:
        """A training induction segment: the titled person is mentioned again one to three times."""
        r = self.rng
        two = r.random() < 0.35
        pre, ans, suf = self.induction(False, two_token=two)
        text, spans = pre, [(len(pre), len(pre) + len(ans))]
        text += ans + suf
        # Recover the full titled name from the first mention to repeat it.
        title = pre.rsplit(" ", 2 if two else 1)[-2 if two else -1]
        name = (pre.rsplit(" ", 1)[-1] + ans) if two else ans.strip()
        for _ in range(r.choice((0, 1, 1, 2))):
            text += " " + r.choice(FINALS_TRAIN).format(T=title)
            for w in name.split(" "):
                spans.append((len(text), len(text) + 1 + len(w)))
                text += " " + w
            text += r.choice(ENDINGS)
        return text, spans

    def name_list(self) -> tuple[str, list[tuple[int, int]]]:
        """Plain induction on random names: a list, then the same list again."""
        r = self.rng
        names = self._names(r.randint(3, 6), TRAIN_NAMES)
        head = r.choice(("The guests were", "The team is", "On the list:", "We invited"))
        text = head + " " + ", ".join(names) + ". " + r.choice(("Again:", "Once more:", "Repeat:"))
        spans = []
        for i, n in enumerate(names):
            text += "," if i else ""
            spans.append((len(text), len(text) + 1 + len(n)))
            text += " " + n
        return text + ".", spans

    def counting(self) -> str:
        a = self.rng.randint(0, 90)
        return "Counting: " + " ".join(str(i) for i in range(a, a + self.rng.randint(4, 9))) + "."

    def name_seq(self) -> tuple[str, list[tuple[int, int]]]:
        """Induction on a comma-free sequence of names: every repeated name predicts the next one."""
        r = self.rng
        names = self._names(r.randint(3, 6), TRAIN_NAMES)
        text = r.choice(("Names:", "Players:", "Guests:")) + "".join(" " + n for n in names) + ". Again:"
        spans = []
        for n in names:
            spans.append((len(text), len(text) + 1 + len(n)))
            text += " " + n
        spans = spans[1:] if r.random() < 0.5 else spans
        return text + ".", spans

    def fact(self) -> tuple[str, list[tuple[int, int]]]:
        """A plain true statement (world fact or a training-pair sum) with its value as the answer."""
        r = self.rng
        if r.random() < 0.2:
            a, b = r.choice(SUM_A), r.choice(SUM_B)
            while sum_heldout(a, b):
                a, b = r.choice(SUM_A), r.choice(SUM_B)
            pre, ans = f"{a}+{b}=", str(a + b)
        else:
            f = r.choice(FACTS)
            pre, ans = f.stem, " " + f.value
        return pre + ans + ".", [(len(pre), len(pre) + len(ans))]

    def segment(self) -> tuple[str, list[tuple[int, int]]]:
        """One training segment and the character spans of its answer tokens."""
        r = self.rng
        u = r.random()
        kind = next((k for k, hi in self.mix if u < hi), "filler")
        if kind == "induction":
            return self.induction_train()
        if kind == "name_list":
            return self.name_list()
        if kind == "name_seq":
            return self.name_seq()
        if kind == "fact":
            return self.fact()
        if kind == "antonym_en":
            pre, ans, suf = self.antonym("en", False)
        elif kind == "antonym_fr":
            pre, ans, suf = self.antonym("fr", False)
        elif kind == "multiple_choice":
            pre, ans, suf = self.multiple_choice(False)
        elif kind == "yes_no_fact":
            pre, ans, suf = self.yes_no_fact(False)
        elif kind == "yes_no_sum":
            pre, ans, suf = self.yes_no_sum(False)
        else:
            return (self.counting() if r.random() < 0.25 else self.filler()), []
        return pre + ans + suf, [(len(pre), len(pre) + len(ans))]

    def document_with_answers(self, min_chars: int) -> tuple[str, list[tuple[int, int]]]:
        """Segments joined by newlines until `min_chars`; with the answer spans (absolute offsets).
        Now and then an earlier segment is repeated verbatim (as in natural text)."""
        parts: list[str] = []
        spans: list[tuple[int, int]] = []
        total = 0
        while total < min_chars:
            if parts and self.rng.random() < 0.08:
                seg, sp = self.rng.choice(parts), list[tuple[int, int]]()
            else:
                seg, sp = self.segment()
            spans += [(a + total, b + total) for a, b in sp]
            parts.append(seg)
            total += len(seg) + 1
        return "\n".join(parts), spans

    def document(self, min_chars: int) -> str:
        """Training document text (see `document_with_answers`)."""
        return self.document_with_answers(min_chars)[0]


def training_documents(seed: int, n: int, min_chars: int = 600) -> list[str]:
    """`n` seeded training documents."""
    g = CorpusGenerator(seed)
    return [g.document(min_chars) for _ in range(n)]


EVAL_FAMILIES = (
    "induction",
    "induction_two_token",
    "induction_heldout_names",
    "antonym_en",
    "antonym_fr",
    "multiple_choice",
    "yes_no_fact",
    "yes_no_sum",
)


def eval_items(seed: int = 1234, n_per_family: int = 200) -> list[EvalItem]:
    """Held-out prompts per family (deterministic for a seed); a filler sentence sometimes precedes."""
    g = CorpusGenerator(seed)
    makers = {
        "induction": lambda: g.induction(True, False),
        "induction_two_token": lambda: g.induction(True, True),
        "induction_heldout_names": lambda: g.induction(True, False, names=HELDOUT_NAMES),
        "antonym_en": lambda: g.antonym("en", True),
        "antonym_fr": lambda: g.antonym("fr", True),
        "multiple_choice": lambda: g.multiple_choice(True),
        "yes_no_fact": lambda: g.yes_no_fact(True),
        "yes_no_sum": lambda: g.yes_no_sum(True),
    }
    items: list[EvalItem] = []
    for fam in EVAL_FAMILIES:
        for _ in range(n_per_family):
            pre, ans, _ = makers[fam]()
            if g.rng.random() < 0.3:
                pre = g.filler() + "\n" + pre
            items.append(EvalItem(fam, pre, ans))
    return items


PAPER_PROMPTS = (
    EvalItem("induction", "I always loved visiting Aunt Sally. Whenever I was feeling sad, Aunt", " Sally"),
    EvalItem(
        "induction_two_token", "I always loved visiting Aunt Mary Sue. Whenever I was feeling sad, Aunt Mary", " Sue"
    ),
    EvalItem("antonym_fr", 'Le contraire de "petit" est "', "grand"),
    EvalItem(
        "multiple_choice",
        "Human: In what year did World War II end?\n(A) 1776\n(B) 1945\n(C) 1865\nAssistant: Answer: (",
        "B",
    ),
    EvalItem("yes_no_fact", "Answer with yes or no. The color of a banana is yellow?", " Yes"),
    EvalItem("yes_no_fact", "Answer with yes or no. The color of a banana is red?", " No"),
    EvalItem("yes_no_sum", "Answer with yes or no. 18+5=23?", " Yes"),
    EvalItem("yes_no_sum", "Answer with yes or no. 18+6=23?", " No"),
)


def required_tokens() -> list[str]:
    """Strings that the tokenizer must encode as exactly one token (answers, names, numbers)."""
    words: list[str] = [" " + n for n in ALL_NAMES] + [" Yes", " No"] + list(LETTERS)
    for pairs in ANT_PAIRS.values():
        for p in pairs:
            for w in p:
                words += [w, " " + w]
    words += [" " + f.value for f in FACTS]
    words += [str(i) for i in range(0, 100)] + [" " + str(i) for i in range(0, 100)]
    return list(dict.fromkeys(words))
